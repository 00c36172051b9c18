"""Worker for test_distributed: one rank of a 2-process gloo conversion of a tiny model.

Launched by `python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUTDIR`.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiny_models import VOCAB, tiny_model  # noqa: E402
from tomoe_core import ConversionConfig, MaskedModel, train_conversion  # noqa: E402


def tiny_run(out: Path, world_tag: str) -> dict:
    torch.manual_seed(0)
    mm = MaskedModel(tiny_model("llama"), num_experts=4, seed=0)
    stream = torch.randint(3, VOCAB, (4000,), generator=torch.Generator().manual_seed(1))
    cfg = ConversionConfig(budget=0.5, num_experts=4, steps=5, tokens_per_step=128, seq_len=32, init_tokens=256,
                           micro_batches=2, checkpoint_every=2, model="tiny")
    train_conversion(mm, stream, cfg, out / f"work-{world_tag}", show_tqdm=False, log=lambda *a: None)
    return {k: v.clone().contiguous() for k, v in mm.trainable_state().items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    state = tiny_run(out, "ddp")
    save_file(state, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()
