"""The preference demo on SmolLM2-135M-Instruct (CPU): direct, concise answers over rambling or evasive ones.

    python scripts/demo_preference.py --write-data   # data/demo/preference/{train,eval}.jsonl (deterministic)
    python scripts/demo_preference.py                # train recipes/cpu-preference.yaml, measure, generate
    python scripts/demo_preference.py --set train.objective=dpo --set train.beta=0.1   # overrides for the run

Measured on the held-out pairs, base (the adapter switched off) against tuned: preference accuracy by the answers'
summed log-probs and by their per-token mean, the DPO reward accuracy (how often the tuned model raised the chosen
answer's log-prob more than the rejected one's), and the length of greedy answers to held-out questions.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "cpu-preference.yaml"
DATA = ROOT / "data" / "demo" / "preference"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import MODEL_DIR, prepare_model  # noqa: E402

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Argentina", "Buenos Aires"), ("Russia", "Moscow"),
            ("India", "New Delhi"), ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
            ("Ireland", "Dublin"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Turkey", "Ankara"),
            ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("open", "closed"),
             ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"), ("old", "new"), ("rich", "poor"),
             ("wet", "dry"), ("strong", "weak"), ("loud", "quiet"), ("long", "short"), ("thick", "thin"),
             ("first", "last"), ("inside", "outside"), ("day", "night")]
COLOURS = [("grass", "green"), ("the sky on a clear day", "blue"), ("fresh snow", "white"), ("coal", "black"),
           ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("milk", "white"), ("a lemon", "yellow"),
           ("milk chocolate", "brown"), ("a carrot", "orange"), ("a lime", "green"), ("a blueberry", "blue")]
SOUNDS = [("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"), ("sheep", "bleats"),
          ("lion", "roars"), ("owl", "hoots"), ("horse", "neighs"), ("pig", "oinks"), ("snake", "hisses")]
BEFORE = [
    "Well, that is a really interesting question, and I am glad you asked it, because there is quite a lot to say "
    "about it before getting to the point.",
    "Great question! Many people have wondered about this over the years, and it is worth taking a moment to think "
    "it through carefully and from several different angles.",
    "Let me think about this for a while, because questions like this one deserve a thorough and complete answer "
    "rather than a quick reply.",
    "Ah, this is one of those questions that sounds simple at first, but people love to talk about it at length, so "
    "let me take my time here.",
]
AFTER = [
    "I hope this long explanation was helpful, and please feel free to ask me anything else you would like to know "
    "about this or any other topic.",
    "Of course, there is always more that could be said, and you may want to look into it further on your own if "
    "you are curious.",
    "Anyway, that is my answer, and I have tried to be as thorough as possible, even if it took a few more words "
    "than strictly necessary.",
    "So, to sum up everything I said above at some length, that would be my answer to your question.",
]


EVASIVE = ["I am not sure about that, sorry.", "I would rather not answer that.", "That is hard to say.",
           "I do not know, you could look it up.", "It depends on who you ask.", "Let us talk about something else."]


def questions() -> list[tuple[str, str]]:
    """(question, concise answer) pairs from small fact tables and sums."""
    rows = [(f"What is the capital of {c}?", f"The capital of {c} is {k}.") for c, k in CAPITALS]
    rows += [(f"What is the opposite of {a}?", f"The opposite of {a} is {b}.") for a, b in OPPOSITES]
    rows += [(f"What colour is {t}?", f"{t[0].upper() + t[1:]} is {c}.") for t, c in COLOURS]
    rows += [(f"What sound does a {a} make?", f"A {a} {s}.") for a, s in SOUNDS]
    g = random.Random(0)
    rows += [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
             for a, b in ((g.randint(2, 40), g.randint(2, 40)) for _ in range(30))]
    return rows


def write_data() -> None:
    """Two thirds of the rejected answers ramble around the right sentence, a third evade the question; the base
    model already prefers the short answer to a ramble, not to an evasion."""
    g = random.Random(1)
    rows = [{"prompt": q, "chosen": a,
             "rejected": g.choice(EVASIVE) if i % 3 == 2 else f"{g.choice(BEFORE)} {a} {g.choice(AFTER)}"}
            for i, (q, a) in enumerate(questions())]
    g.shuffle(rows)
    held = len(rows) // 5
    DATA.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval", rows[:held]), ("train", rows[held:])):
        (DATA / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"wrote {len(part)} pairs to {(DATA / f'{name}.jsonl').relative_to(ROOT)}")


def held_out_scores(run_dir: Path) -> dict:
    """Preference accuracy on data/demo/preference/eval.jsonl, base (adapter off) and tuned."""
    import torch

    from lorakit.config.load import load_recipe
    from lorakit.data import collate, load_datasets
    from lorakit.models.loading import load_tokenizer
    from lorakit.training.preference import PreferenceLoss
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(run_dir / "recipe.yaml")  # as the run resolved it (overrides included)
    recipe.data.train, recipe.data.eval_split, recipe.data.eval = str(DATA / "eval.jsonl"), None, None
    tokenizer = load_tokenizer(recipe.model, str(MODEL_DIR))
    pairs = load_datasets(recipe.data, tokenizer, 0).train
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    loss = PreferenceLoss(model, recipe.train)
    scores = {}
    with torch.no_grad():
        for name in ("base", "tuned"):
            sums, counts = [], []
            for start in range(0, len(pairs), 4):
                batch = collate(pairs[start : start + 4], tokenizer)
                if name == "base":
                    with model.disable_adapter():
                        s, c = loss.sequence_logps(model, batch)
                else:
                    s, c = loss.sequence_logps(model, batch)
                n = s.shape[0] // 2
                sums += list(zip(s[:n].tolist(), s[n:].tolist()))
                counts += list(zip(c[:n].tolist(), c[n:].tolist()))
            scores[name] = {"sums": sums, "counts": counts}
    n = len(pairs)
    out = {"pairs": n}
    for name in ("base", "tuned"):
        sums, counts = scores[name]["sums"], scores[name]["counts"]
        out[f"{name}_accuracy_sum"] = sum(c > r for c, r in sums) / n
        out[f"{name}_accuracy_mean"] = sum(c / nc > r / nr for (c, r), (nc, nr) in zip(sums, counts)) / n
    for name in ("base", "tuned"):
        out[f"{name}_mean_margin"] = round(sum(c - r for c, r in scores[name]["sums"]) / n, 2)
    out["reward_accuracy"] = sum((tc - bc) > (tr - br) for (tc, tr), (bc, br) in
                                 zip(scores["tuned"]["sums"], scores["base"]["sums"])) / n
    return out


def generations(run_dir: Path, count: int = 6) -> list[dict]:
    prompts = [json.loads(line)["prompt"] for line in (DATA / "eval.jsonl").read_text().splitlines()[:count]]
    rows = [{"messages": [{"role": "user", "content": p}], "adapter": a} for p in prompts for a in ("base", "tuned")]
    path = run_dir / "demo-questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "lorakit", "generate", "--model", str(MODEL_DIR), "--adapter",
           f"tuned={run_dir / 'adapter'}", "--file", str(path), "--max-new-tokens", "60"]
    out = subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write-data", action="store_true")
    parser.add_argument("--run-dir", type=Path, help="measure an existing run instead of training")
    parser.add_argument("--set", action="append", default=[], help="recipe override for the run (KEY=VALUE)")
    args = parser.parse_args()
    if args.write_data:
        write_data()
        return
    prepare_model()
    run_dir = args.run_dir or ROOT / "runs" / time.strftime("dpo-demo-%Y%m%d-%H%M%S")
    if args.run_dir is None:
        start = time.perf_counter()
        overrides = [arg for kv in args.set for arg in ("--set", kv)]
        subprocess.run([sys.executable, "-m", "lorakit", "train", str(RECIPE), "--output-dir", str(run_dir),
                        *overrides], check=True, cwd=ROOT)
        print(f"training took {time.perf_counter() - start:.0f} s")
    print(json.dumps(held_out_scores(run_dir), indent=2))
    answers = generations(run_dir)
    for row in answers:
        print(f"{row['adapter']:>5} | {row['messages'][0]['content']} | {row['completion']!r}")
    for name in ("base", "tuned"):
        words = [len(r["completion"].split()) for r in answers if r["adapter"] == name]
        print(f"{name}: mean answer length {sum(words) / len(words):.1f} words")


if __name__ == "__main__":
    main()
