"""Worker for test_faults: a tiny conversion that a test kills with SIGKILL mid-run, then resumes.

python tests/kill_worker.py WORKDIR OUT.safetensors [SLEEP_S]
"""
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiny_models import VOCAB, tiny_model  # noqa: E402
from tomoe_core import ConversionConfig, MaskedModel, train_conversion  # noqa: E402

STEPS = 12


def run(workdir: Path, sleep_s: float = 0.0) -> dict:
    torch.manual_seed(0)
    mm = MaskedModel(tiny_model("qwen2"), num_experts=4, seed=0)
    stream = torch.randint(3, VOCAB, (4000,), generator=torch.Generator().manual_seed(1))
    cfg = ConversionConfig(budget=0.5, num_experts=4, steps=STEPS, tokens_per_step=64, seq_len=32, init_tokens=256,
                           checkpoint_every=1, model="tiny")
    train_conversion(mm, stream, cfg, workdir, show_tqdm=False, log=lambda *a: None,
                     progress=lambda *a: time.sleep(sleep_s))
    return {k: v.clone().contiguous() for k, v in mm.trainable_state().items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    state = run(Path(sys.argv[1]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
    save_file(state, sys.argv[2])
