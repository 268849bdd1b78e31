"""Stop tokens survive into serving: a template whose end-of-turn is not the EOS (Llama 3) stops after one answer."""

import json

import pytest
import torch

from lorakit.data.stop_tokens import end_of_turn_ids, stop_token_ids
from lorakit.testing import MEMORISATION_ROWS, build_tiny_llama, build_tokenizer
from run_helpers import cli, train_chat_memorisation


@pytest.fixture(scope="module")
def llama3_model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama3"), tokenizer_style="llama3")


def test_end_of_turn_tokens_of_templates():
    llama3 = build_tokenizer(style="llama3")
    eot, eos = llama3.convert_tokens_to_ids("<|eot_id|>"), llama3.convert_tokens_to_ids("<|end_of_text|>")
    assert end_of_turn_ids(llama3) == [eot] and llama3.eos_token_id == eos
    assert stop_token_ids(llama3) == [eos, eot]
    chatml = build_tokenizer()
    assert stop_token_ids(chatml) == [chatml.convert_tokens_to_ids("<|im_end|>")]  # EOS ends turns: one id
    chatml.chat_template = None
    assert end_of_turn_ids(chatml) == []


@pytest.fixture(scope="module")
def llama3_run(llama3_model_dir, tmp_path_factory):
    """A run memorising short chat answers in the Llama 3 template, saved as adapter and merged model."""
    return train_chat_memorisation(tmp_path_factory.mktemp("llama3-run"), llama3_model_dir)


def _question_ids(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


@pytest.mark.slow
def test_merged_model_stops_after_one_answer_with_plain_transformers(llama3_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_run / "merged")
    eos, eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eos != eot
    result = cli("merge", llama3_run / "adapter", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    for folder in (llama3_run / "adapter", llama3_run / "merged", tmp_path / "merged"):
        assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [eos, eot], folder

    model = AutoModelForCausalLM.from_pretrained(llama3_run / "merged", dtype=torch.float32)
    inputs = _question_ids(tokenizer, "What is the capital of France?")
    n = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, n:].tolist()
    answers = {answer for _, answer in MEMORISATION_ROWS}  # 40 steps do not memorise which answer goes where
    assert out[-1] == eot and eot not in out[:-1] and tokenizer.decode(out[:-1]) in answers, tokenizer.decode(out)
    # What the fix prevents: stopping on the EOS alone, the model runs past its answer to the token limit.
    runaway = model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=eos)[0, n:].tolist()
    assert len(runaway) == 24 and runaway[: len(out)] == out


@pytest.mark.slow
def test_lorakit_generate_stops_on_the_end_of_turn_token(llama3_run, llama3_model_dir):
    from lorakit.tools.generate import generation_stop_ids, load_for_generation
    from lorakit.config.schema import ModelSection

    adapter = llama3_run / "adapter"
    model, tokenizer = load_for_generation(ModelSection(name_or_path=str(llama3_model_dir)), {"run": adapter},
                                           allow_pickle=False, device="cpu")
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # a base that knows only its EOS
    tokenizer.chat_template = None  # ... and no template: the adapter's record still names <|eot_id|>
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in generation_stop_ids(model, tokenizer, [adapter])
    result = cli("generate", "--model", llama3_model_dir, "--adapter", f"run={adapter}", "--chat",
                 "--prompt", "What is the capital of France?", "--max-new-tokens", "24")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] in {answer for _, answer in MEMORISATION_ROWS}
