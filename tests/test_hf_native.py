"""A converted model behaves like any Hugging Face model: pipeline, dtype/device_map, save_pretrained
round trip with shards, hub-ready export loaded without tomoe_core, and the stock lm-eval CLI.

Tiny random models with a word-level tokenizer over the most frequent words of the held-out text
(built here with `tokenizers`: no download).
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, pipeline

from tomoe_core import MaskedModel, load_converted, materialise, save_converted
from tomoe_core.moe.metadata import ConvertedModelError
from tomoe_core.moe.modeling import ToMoEForCausalLM, read_metadata
from tomoe_core.text.sources import load_documents
from tomoe_core.workflows.export import export_hub_ready

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<unk>", "<s>", "</s>"]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: one id per word (VOCAB ids in all), whitespace-split, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIALS + words[:VOCAB - len(SPECIALS)])}
    assert len(vocab) == VOCAB, "the held-out text has too few distinct words"
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture(scope="module")
def heldout_sentences() -> list[list[str]]:
    """Lower-case word sentences of the project's held-out text."""
    sentences = []
    for doc in load_documents("wiki", "heldout"):
        for sentence in re.split(r"[.!?]\s", doc.text):
            words = re.findall(r"[a-z]+", sentence.lower())
            if 8 <= len(words) <= 24:
                sentences.append(words)
    return sentences


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, heldout_sentences):
    """A dense tiny llama with its tokenizer (folder), and a conversion of it at p = 0.5 (folder)."""
    root = tmp_path_factory.mktemp("hf_native")
    counts = collections.Counter(w for s in heldout_sentences for w in s)
    tokenizer = word_tokenizer([w for w, _ in counts.most_common()])
    dense = tiny_model("llama")
    with torch.no_grad():  # random init is near-uniform over the vocabulary: sharpen it so models differ
        for p in dense.parameters():
            if p.ndim == 2:
                p.mul_(8)
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    masked = MaskedModel(AutoModelForCausalLM.from_pretrained(root / "dense"), num_experts=4)
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(4, size, generator=g) < 0.5).float() for size in masked.intermediate_sizes]
    moe = materialise(masked, masks, budget=0.5)
    meta = {"model": str(root / "dense"), "budget": 0.5, "settings": {"steps": 0, "experts": 4},
            "layers": [{"expert_widths": [0.5] * 4, "union": 0.9}] * 2}
    save_converted(moe, root / "conversion", tokenizer, meta)
    return {"root": root, "dense": root / "dense", "conversion": root / "conversion", "tokenizer": tokenizer}


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


PROMPT = "the first of the"


def test_text_generation_pipeline_runs_on_a_converted_folder(tiny):
    assert ToMoEForCausalLM.can_generate()
    pipe = pipeline("text-generation", model=str(tiny["conversion"]), device="cpu")
    assert isinstance(pipe.model, ToMoEForCausalLM)
    text = pipe(PROMPT, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    token_ids = pipe(PROMPT, max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    model, tokenizer, _ = load_converted(tiny["conversion"])
    ids = ids_of(tokenizer, PROMPT)
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert expected.shape[1] == ids.shape[1] + 6
    assert list(token_ids) == expected[0].tolist()  # the pipeline runs the converted model itself
    assert text.startswith(PROMPT) and len(text.split()) > len(PROMPT.split())


def test_from_pretrained_honours_dtype_and_device_map(tiny):
    folder = tiny["conversion"]
    ids = ids_of(tiny["tokenizer"], PROMPT + " city of the world")
    ref = AutoModelForCausalLM.from_pretrained(folder)
    assert ref.dtype == torch.float32
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
    half = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.device.type == "cpu"
    for layout in ("shared", "packed", "core+extras"):  # derived expert weights follow the dtype too
        half.set_layout(layout)
        with torch.no_grad():
            logits = half(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), ref_logits, rtol=0.05, atol=0.05)
    if torch.cuda.is_available():
        gpu = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda")
        assert {p.device.type for p in gpu.parameters()} == {"cuda"}
        with torch.no_grad():
            torch.testing.assert_close(gpu(input_ids=ids.cuda()).logits.float().cpu(), ref_logits, rtol=0.05, atol=0.05)


def test_save_pretrained_round_trip_keeps_metadata_tokenizer_and_shards(tiny, tmp_path):
    source_meta = read_metadata(tiny["conversion"])
    model = AutoModelForCausalLM.from_pretrained(tiny["conversion"])
    out = tmp_path / "resaved"
    model.save_pretrained(out, max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists()
    meta = read_metadata(out)
    for key, value in source_meta.items():
        if key not in ("saved_at", "weights_sha256"):
            assert meta[key] == value, key
    assert sorted(meta["weight_files"]) == shards
    reloaded, tokenizer, _ = load_converted(out, layout="shared")
    ids = ids_of(tokenizer, PROMPT)
    model.set_layout("shared")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # every shard is checked against tomoe.json
    with open(out / shards[-1], "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\0\0\0\0")
    with pytest.raises(ConvertedModelError, match=re.escape(shards[-1]) + " does not match the checksum"):
        load_converted(out)


def _evaluate_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tomoe_core", "evaluate", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_evaluate_cli_on_a_resaved_conversion_uses_the_dense_model_it_names(tiny, heldout_sentences, tmp_path):
    out = tmp_path / "resaved"
    AutoModelForCausalLM.from_pretrained(tiny["conversion"]).save_pretrained(out)
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(" ".join(s) for s in heldout_sentences[:200]))
    common = ["--text", text, "--window", 32, "--max-windows", 2, "--baselines", "none", "--no-routing-modes"]
    done = _evaluate_cli(out, *common, "--output", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["model"] == str(tiny["dense"])
    assert set(result["results"]) >= {"dense", "tomoe"} and result["windows"] == 2
    # another dense model than the one converted: a message, not a crash deep in the evaluation
    other = tmp_path / "other-dense"
    tiny_model("llama", vocab_size=VOCAB + 3).save_pretrained(other)
    tiny["tokenizer"].save_pretrained(other)
    done = _evaluate_cli(out, "--model", other, *common, "--output", tmp_path / "eval2.json")
    assert done.returncode == 2 and "vocabulary of 97 tokens" in done.stderr and "--model" in done.stderr


def test_conversion_without_a_named_dense_model_asks_for_one(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny["conversion"])
    model.save_pretrained(tmp_path / "anonymous", metadata={"budget": 0.5})
    done = _evaluate_cli(tmp_path / "anonymous", "--baselines", "none")
    assert done.returncode == 2 and "names no dense model" in done.stderr and "--model" in done.stderr


# -- hub-ready export -------------------------------------------------------------------------------
BLOCK_TOMOE_CORE = """
import importlib.abc, sys
class _NoTomoeCore(importlib.abc.MetaPathFinder):  # even if tomoe_core is pip-installed here
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tomoe_core":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _NoTomoeCore())
"""


def _without_repository(tmp_path: Path) -> dict:
    """Environment of a process that cannot see the repository: cwd elsewhere, no PYTHONPATH, own caches."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def export(tiny):
    """A hub-ready export of the conversion, whose dense config carries a GGUF quantization_config
    as dense checkpoints dequantised from GGUF do."""
    folder = tiny["root"] / "conversion-gguf"
    model, tokenizer, meta = load_converted(tiny["conversion"])
    model.config.base_config = {**model.config.base_config, "quantization_config": {"quant_method": "gguf"}}
    save_converted(model, folder, tokenizer, meta)
    return export_hub_ready(folder, tiny["root"] / "export")


def test_export_is_self_contained_and_its_code_is_the_engines(export):
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling.ToMoEConfig", "AutoModelForCausalLM": "modeling.ToMoEForCausalLM"}
    assert "quantization_config" not in config["base_config"]
    assert config["max_position_embeddings"] == config["base_config"]["max_position_embeddings"]  # lm-eval's max_length
    code = sorted(p.name for p in export.glob("*.py"))
    assert code == sorted(p.name for p in (ROOT / "tomoe_core" / "moe").glob("*.py"))  # exactly the runtime folder
    for name in code:  # copied at export time from the engine, not a second copy kept by hand
        assert (export / name).read_bytes() == (ROOT / "tomoe_core" / "moe" / name).read_bytes(), name
    assert (export / "tokenizer.json").exists() and read_metadata(export)["exported_from"].endswith("conversion-gguf")


def test_export_loads_with_trust_remote_code_in_a_process_without_tomoe_core(export, tiny, tmp_path):
    ids = ids_of(tiny["tokenizer"], PROMPT + " city of the world")
    script = BLOCK_TOMOE_CORE + f"""
import json, torch
from transformers import AutoModelForCausalLM
try:
    import tomoe_core
    raise SystemExit("tomoe_core is importable")
except ModuleNotFoundError:
    pass
assert not any(p and __import__("os").path.realpath(p) == {str(ROOT)!r} for p in sys.path), sys.path
model = AutoModelForCausalLM.from_pretrained({str(export)!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
with torch.no_grad():
    logits = model(input_ids=torch.tensor({ids.tolist()!r})).logits
torch.save(logits, "logits.pt")
print(json.dumps({{"class": type(model).__name__, "layout": model.layout}}))
"""
    env = _without_repository(tmp_path)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["class"] == "ToMoEForCausalLM"
    model, _, _ = load_converted(tiny["conversion"], layout=info["layout"])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


# -- stock lm-evaluation-harness CLI ----------------------------------------------------------------
def _last_word_task(sentences: list[list[str]], folder: Path, count: int = 24) -> str:
    """A local loglikelihood task: the last word of held-out sentences given the words before it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"context": " ".join(s[:-1]), "target": " " + s[-1]} for s in sentences[:count]]
    (folder / "lastword.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tomoe_lastword.yaml").write_text(f"""task: tomoe_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'lastword.jsonl'}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return "tomoe_lastword"


@torch.no_grad()
def _last_word_scores(model, tokenizer, task_dir: Path) -> tuple[float, float]:
    """(perplexity, accuracy) of the task's targets computed directly: what lm-eval must report."""
    lls, greedy = [], []
    for line in (task_dir / "lastword.jsonl").read_text().splitlines():
        row = json.loads(line)
        context = ids_of(tokenizer, row["context"])[0]
        whole = ids_of(tokenizer, row["context"] + row["target"])[0]
        target = whole[len(context):]
        logprobs = model(input_ids=whole[None, :-1]).logits[0, len(context) - 1:].log_softmax(-1)  # (T, V)
        lls.append(float(logprobs.gather(-1, target[:, None]).sum()))
        greedy.append(bool((logprobs.argmax(-1) == target).all()))
    return float(torch.tensor(lls).mean().neg().exp()), sum(greedy) / len(greedy)


def _start_lm_eval(pretrained: Path, task: str, task_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The stock CLI, in a process that cannot see the repository (the console script pip installs)."""
    lm_eval = Path(sys.executable).with_name("lm_eval")
    out = tmp_path / f"lm-eval-{pretrained.name}"
    cmd = [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={pretrained},trust_remote_code=True",
           "--tasks", task, "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1",
           "--output_path", str(out)]
    run_dir = tmp_path / f"run-{pretrained.name}"
    run_dir.mkdir()
    proc = subprocess.Popen(cmd, cwd=run_dir, env=_without_repository(run_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, out


def _lm_eval_result(proc: subprocess.Popen, out: Path, task: str) -> dict:
    _stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    (result,) = out.rglob("results_*.json")
    return json.loads(result.read_text())["results"][task]


def test_stock_lm_eval_cli_runs_on_the_dense_model_and_the_export(tiny, export, heldout_sentences, tmp_path):
    task_dir = tmp_path / "tasks"
    task = _last_word_task(heldout_sentences[200:], task_dir)
    tokenizer = tiny["tokenizer"]
    dense_expected = _last_word_scores(AutoModelForCausalLM.from_pretrained(tiny["dense"]), tokenizer, task_dir)
    moe_expected = _last_word_scores(load_converted(tiny["conversion"])[0], tokenizer, task_dir)
    assert abs(dense_expected[0] - moe_expected[0]) > 0.05 * dense_expected[0]  # the two models are told apart
    runs = [(_start_lm_eval(folder, task, task_dir, tmp_path), scores)  # both at once: most of it is start-up
            for folder, scores in ((tiny["dense"], dense_expected), (export, moe_expected))]
    for (proc, out), (ppl, acc) in runs:
        result = _lm_eval_result(proc, out, task)
        assert result["perplexity,none"] == pytest.approx(ppl, rel=1e-4), out.name
        assert result["acc,none"] == pytest.approx(acc), out.name


def test_weights_that_do_not_match_the_config_are_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from tomoe_core.moe.atomic import atomic_write_json, sha256_file

    folder = tmp_path / "bad"
    AutoModelForCausalLM.from_pretrained(tiny["conversion"]).save_pretrained(folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    router = next(k for k in state if k.endswith("router.weight"))
    save_file({k: v for k, v in state.items() if k != router}, str(weights), metadata={"format": "pt"})
    atomic_write_json(folder / "tomoe.json", {**read_metadata(folder), "weights_sha256": sha256_file(weights)})
    with pytest.raises(ConvertedModelError, match=re.escape(router)):
        load_converted(folder)
