"""Assistant turns from one rendering for templates lorakit does not ship (lorakit.data.turns): exactly the spans of
rendering once per turn wherever its rules admit a template, the per-turn definition everywhere else."""

import random

import pytest

from lorakit.config.schema import ModelSection
from lorakit.data import chat, turns
from lorakit.data.chat import bundled_template, chat_spans, named_chat_templates
from lorakit.errors import UsageError

# SmolLM2-Instruct's own template (a default system prompt when the conversation has none)
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
           " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt"
           " %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# What lies behind may be read: a variable carried from the previous iteration, a nested loop's own loop.last,
# a namespace, messages[0], whitespace control on every tag.
BEHIND = """{%- set ns = namespace(turn=0) -%}
{%- if messages[0]['role'] == 'system' %}[SYS]{% endif -%}
{%- for message in messages -%}
  <{{ message['role'] }}>{% if loop.changed(message['role']) %}#{{ loop.index }}{% endif -%}
  {%- for word in message['content'].split(' ') -%}{{ word }}{% if not loop.last %}_{% endif %}{%- endfor -%}
  {%- set ns.turn = ns.turn + 1 %} |{{ ns.turn }}|
{% endfor -%}
{%- if add_generation_prompt %}<assistant>{% endif -%}"""
# Each reads what is ahead, or writes after the loop: one rendering per turn.
AHEAD = {
    "loop.last": "{% for m in messages %}{{ m['content'] }}{% if loop.last %}.{% endif %}{% endfor %}",
    "length": "{% for m in messages %}{{ m['content'] }}/{{ messages | length }}{% endfor %}",
    "next message": "{% for m in messages %}{{ m['content'] }}{% if loop.index < 9 and messages[loop.index] is defined %}"
                    "+{% endif %}{% endfor %}",
    "prompt in the loop": "{% for m in messages %}{{ m['content'] }}{% if add_generation_prompt %}?{% endif %}{% endfor %}",
    "text after": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{{ eos_token }}",
    "sliced": "{% for m in messages[1:] %}{{ m['content'] }}{% endfor %}",
    "varying prompt": "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
                      "{{ messages[0]['role'] }}{% endif %}",
}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from lorakit.models.loading import load_tokenizer

    return load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng, out = random.Random(seed), []
    for _ in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []
        for t in range(rng.randint(1, 9)):
            role = rng.choice(["user", "assistant"]) if rng.random() < 0.2 else ("user", "assistant")[t % 2]
            messages.append({"role": role, "content": " ".join(rng.choice(["a", "b c", "", "\n", "é"])
                                                               for _ in range(rng.randint(0, 4)))})
        out.append(messages)
    return out


def per_turn(tok, template, messages):
    try:
        return chat._per_turn_spans(template, messages, "row 1", tok.special_tokens_map)
    except UsageError as e:
        return str(e)


def spans(tok, template, messages):
    with chat.rendering_with(tok, template):
        try:
            return chat_spans(tok, messages, "row 1")
        except UsageError as e:
            return str(e)


TEMPLATES = {**{name: bundled_template(name) for name in named_chat_templates()}, "smollm2": SMOLLM2, "behind": BEHIND}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_one_rendering_gives_the_spans_of_one_rendering_per_turn(tok, name, monkeypatch):
    template = "{#- not bundled -#}" + TEMPLATES[name]  # a bundled one, as a model's own: by the rules, not its tags
    assert turns.tracked_template(template) is not None
    expected = [per_turn(tok, template, m) for m in conversations(150)]
    monkeypatch.setattr(chat, "_per_turn_spans", lambda *a: pytest.fail("rendered per turn"))
    got, fallbacks = [], 0
    for messages, want in zip(conversations(150), expected):
        if isinstance(want, str):  # the template renders this one inconsistently: the definition refuses it
            fallbacks += 1
            continue
        got.append(spans(tok, template, messages) == want)
    assert all(got) and fallbacks < len(expected) // 2


@pytest.mark.parametrize("name", sorted(AHEAD))
def test_a_template_reading_ahead_is_rendered_per_turn(tok, name):
    template = AHEAD[name]
    assert turns.tracked_template(template) is None
    for messages in conversations(20, seed=1):
        assert spans(tok, template, messages) == per_turn(tok, template, messages)


def test_an_assistant_turn_not_opened_by_the_prompt_falls_back_to_the_definition(tok, monkeypatch):
    # the generation prompt is "A:", but an empty answer is written "a:": the definition refuses such a row
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'a:' if m['content'] == '' else 'A:' }}"
                "{% else %}U:{% endif %}{{ m['content'] }};{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    assert turns.tracked_template(template) is not None
    fine = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert spans(tok, template, fine) == per_turn(tok, template, fine) == ("U:hi;A:yo;", [(7, 10)])
    odd = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    refused, calls, definition = per_turn(tok, template, odd), [], chat._per_turn_spans
    assert "renders the start of the conversation at row 1 differently" in refused
    monkeypatch.setattr(chat, "_per_turn_spans", lambda *a: calls.append(a) or definition(*a))
    # one rendering found the turn not opened by the prompt; the definition decided
    assert spans(tok, template, odd) == refused and len(calls) == 1


def test_templates_with_their_own_generation_blocks_or_nested_loops_over_messages_are_left_alone():
    tagged = (chat.TEMPLATE_DIR / "chatml.jinja").read_text()
    assert turns.tracked_template(tagged) is None
    twice = "{% for m in messages %}{{ m['role'] }}{% endfor %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert turns.tracked_template(twice) is None
    assert turns.tracked_template("{{ bos_token }}") is None  # no loop at all
