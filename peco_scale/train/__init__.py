"""Training: one :class:`~peco_scale.train.trainer.Trainer` and a stage spec per task (tokenizer, pretrain, finetune, segment)."""
