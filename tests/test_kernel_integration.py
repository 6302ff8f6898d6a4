"""The library calls the kernels through a runtime argument (`kernels: auto|triton|torch`, the run's
`train.kernels`): the Triton path gives the same training behaviour as the torch path, in the
quantizer and in the MIM head."""

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from peco_scale.models.mim import MIMTask  # noqa: E402
from peco_scale.models.quantizer import EMAVectorQuantizer, QuantizerConfig  # noqa: E402
from peco_scale.models.tokenizer import TOKENIZER_PRESETS, TokenizerModelConfig, VQTokenizer  # noqa: E402
from peco_scale.models.vit import VIT_PRESETS, MaskedViT  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)


def test_quantizer_training_steps_agree_between_backends():
    cfg = dict(codebook_size=64, dim=8, kmeans_init=False, dead_code_steps=0)
    torch.manual_seed(0)
    a = EMAVectorQuantizer(QuantizerConfig(**cfg), kernels="torch").to(DEVICE).train()
    b = EMAVectorQuantizer(QuantizerConfig(**cfg), kernels="triton").to(DEVICE).train()
    b.load_state_dict(a.state_dict())
    for step in range(3):
        z = torch.randn(4, 8, 5, 3, device=DEVICE)
        oa, ob = a(z), b(z)
        assert torch.equal(oa["indices"], ob["indices"]), step
        torch.testing.assert_close(oa["z_q"], ob["z_q"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(oa["perplexity"], ob["perplexity"])
    for name, buf in a.named_buffers():
        torch.testing.assert_close(buf, dict(b.named_buffers())[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mim_task_loss_and_grads_agree_between_backends():
    torch.manual_seed(0)
    m = TokenizerModelConfig()
    for k, v in TOKENIZER_PRESETS["tiny"].items():
        if k.startswith("model."):
            setattr(m, k[6:], v)
    tok = VQTokenizer(m, QuantizerConfig(codebook_size=256, dim=16, kmeans_init=False)).eval()
    task_t = MIMTask(MaskedViT(VIT_PRESETS["vit_pico_patch16"], 64, drop_path=0.0), tok, kernels="torch").to(DEVICE)
    tok2 = VQTokenizer(m, QuantizerConfig(codebook_size=256, dim=16, kmeans_init=False)).eval()
    tok2.load_state_dict(tok.state_dict())
    task_k = MIMTask(MaskedViT(VIT_PRESETS["vit_pico_patch16"], 64, drop_path=0.0), tok2, kernels="triton").to(DEVICE)
    task_k.load_state_dict(task_t.state_dict())
    task_t.to_device(torch.device(DEVICE))
    task_k.to_device(torch.device(DEVICE))
    x = torch.randn(3, 3, 64, 64, device=DEVICE)
    xt = torch.rand(3, 3, 64, 64, device=DEVICE) * 2 - 1
    mask = torch.rand(3, 16, device=DEVICE) < 0.4
    mask[:, 0] = True
    assert torch.equal(task_t.targets(xt), task_k.targets(xt))
    out_t, out_k = task_t(x, xt, mask), task_k(x, xt, mask)
    torch.testing.assert_close(out_k["loss"], out_t["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_k["mlm_acc"], out_t["mlm_acc"])
    out_t["loss"].backward()
    out_k["loss"].backward()
    for (name, pt), pk in zip(task_t.named_parameters(), task_k.parameters()):
        torch.testing.assert_close(pk.grad, pt.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_pretrain_under_zero3_same_losses_with_triton_kernels(demo_data, tiny_tokenizer, tmp_path):
    """The whole stage-2 step (target lookup + fused head under DeepSpeed ZeRO-3) through the Triton
    kernels gives the torch path's losses."""
    from conftest import pretrain_args, read_metrics, run_launch

    runs = {}
    for k in ("torch", "triton"):
        res = run_launch("launch/pretrain.py", pretrain_args(demo_data, tiny_tokenizer, tmp_path / k, **{
            "max_steps": 3, "train.kernels": k}))
        assert res.returncode == 0, res.stderr[-3000:]
        runs[k] = read_metrics(tmp_path / k)
    for a, b in zip(runs["torch"], runs["triton"]):
        for key in ("loss", "mlm_acc", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
