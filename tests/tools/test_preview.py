"""`lorakit preview-data`: the rows as the model sees them, through the real CLI; no model is loaded."""

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from lorakit.cli.main import app
from lorakit.tools.preview import MASKED_STYLE, SUPERVISED_STYLE, PreviewRow, counts, preview_rows, render_rich, spans
from lorakit.config.schema import DataSection, ModelSection

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(scope="module")
def tokenizer_only_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's directory without its weights: preview-data must not need them."""
    out = tmp_path_factory.mktemp("tokenizer-only")
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    return out


def make_recipe(tmp_path, model_dir, rows, **data) -> str:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"model": {"name_or_path": str(model_dir)}, "data": {"train": str(train), **data},
              "train": {"max_steps": 1}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_preview_shows_supervised_spans_counts_and_the_summary(tmp_path, tokenizer_only_dir):
    rows = [{"instruction": "Say hi", "output": "hi there"}, {"instruction": "Add", "input": "2+2", "output": "4"}]
    result = CliRunner().invoke(app, ["preview-data", make_recipe(tmp_path, tokenizer_only_dir, rows), "-n", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "[[hi there<|im_end|>]]" in out and "### Instruction:\nSay hi" in out
    assert "train.jsonl:1" in out and "5 supervised" in out and "kept" in out
    assert "train.jsonl:2" not in out  # -n 1
    assert "train data: rows 2: kept 2 (0 truncated)" in out


def test_preview_warns_about_rows_without_supervision_or_eos(tmp_path, tokenizer_only_dir):
    rows = [{"messages": CHAT[:2]}, {"messages": CHAT}]
    recipe = make_recipe(tmp_path, tokenizer_only_dir, rows, format="chat")
    out = CliRunner().invoke(app, ["preview-data", recipe, "--no-stats"]).output
    assert "0 supervised  dropped: no supervised tokens" in out and "warning: no supervised tokens" in out
    assert "[[Paris.<|im_end|>\n]]" in out and "train data:" not in out
    llama3 = CliRunner().invoke(app, ["preview-data", recipe, "--set", "data.chat_template=llama3"])
    assert "warning: no supervised EOS (<|im_end|>)" in llama3.stdout  # its <|eot_id|> is not this tokenizer's EOS
    # the split's warnings: lorakit's warning channel (stderr), as at the start of a run
    assert "warning: train data: " in llama3.stderr and "never supervise the EOS token" in llama3.stderr


def test_preview_of_an_empty_file_is_exit_3_even_without_stats(tmp_path, tokenizer_only_dir):
    """--no-stats skipped the loading that finds an empty dataset: exit 0 with only the legend printed."""
    result = CliRunner().invoke(app, ["preview-data", make_recipe(tmp_path, tokenizer_only_dir, []), "--no-stats"])
    assert result.exit_code == 3 and "train.jsonl is empty: it holds no rows" in result.output


def test_preview_json_logs(tmp_path, tokenizer_only_dir):
    recipe = make_recipe(tmp_path, tokenizer_only_dir, [{"instruction": "a", "output": "b"}])
    result = CliRunner().invoke(app, ["--json-logs", "preview-data", recipe])
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    (preview,) = [e for e in events if e["event"] == "preview"]
    assert preview["supervised"] == 2 and [t for t, s in preview["spans"] if s] == ["b<|im_end|>"]
    assert any(e["event"] == "data" and e["split"] == "train" for e in events)


def test_rich_rendering_highlights_supervised_and_dims_masked(tmp_path, tiny_model_dir):
    from rich.console import Console

    from lorakit.models.loading import load_tokenizer

    tok = load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"messages": CHAT}) + "\n")
    (row,) = preview_rows(DataSection(train=str(train), format="chat"), tok, 3)
    assert isinstance(row, PreviewRow)
    assert counts(row.example) == [(len(row.example), sum(label != -100 for label in row.example.labels[1:]))]
    console = Console(record=True, force_terminal=True, width=120)
    console.print(render_rich(1, row, tok))
    assert "Paris." in console.export_text()
    body = render_rich(1, row, tok).renderables[1]
    styled = {body.plain[s.start : s.end]: s.style for s in body.spans}
    assert styled["Paris.<|im_end|>\n"] == SUPERVISED_STYLE
    assert [t for t, s in spans(row.example, tok) if not s][0].startswith("<|im_start|>system\nBe brief.")
    assert MASKED_STYLE in styled.values()

