"""Evaluation metrics of the transfer tasks: ``segmentation`` (confusion matrix, mIoU, per-class
IoU, pixel accuracy, as mmsegmentation reports them) and ``detection`` (COCO box and mask AP by
pycocotools)."""
