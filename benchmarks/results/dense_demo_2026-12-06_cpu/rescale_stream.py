"""The `pre_c15` experiment's backbone: a stage-2 run's ViT with its residual stream scaled by c.

Every block is pre-LayerNorm, so multiplying the embeddings (patch projection, position
embedding, class token) and every layer-scale gamma by c multiplies the residual stream, and so
the last block's output, by c: the same function up to that factor (which the feature pyramid's
first LayerNorm removes). Only the parameters' sizes change, and with them how far AdamW's steps
move them relative to their size.

    python rescale_stream.py RUN_DIR OUT.safetensors C
"""

import sys

from safetensors.torch import save_file

from peco_scale.engine.weights import load_pretrained

SCALED = ("patch_embed.", "pos_embed", "cls_token")

if __name__ == "__main__":
    src, out, c = sys.argv[1], sys.argv[2], float(sys.argv[3])
    sd, _ = load_pretrained(src)
    sd = {k: (v * c if k.startswith(SCALED) or k.endswith((".ls1.gamma", ".ls2.gamma")) else v).contiguous()
          for k, v in sd.items()}
    save_file(sd, out)
    print(f"wrote {out}: {len(sd)} tensors, stream scaled by {c}")
