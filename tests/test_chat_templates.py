"""Chat templates render exactly as transformers' apply_chat_template renders them (golden
texts from tests/fixtures/make_chat_template_golden.py): SmolLM2's own template and three written
in the shapes of the Llama 3, Qwen2 and Mistral templates — strftime_now, tojson with indent and
non-ASCII text, {% break %} / {% continue %}, namespaces, raise_exception, {% generation %},
tools, add_generation_prompt on and off."""
import datetime
import json

import pytest
import tokenizers

from conftest import FIXTURES, TINY

from jaxserve.model import gguf_file, weights
from jaxserve.tokenizer import Tokenizer

GOLDEN = json.loads((FIXTURES / "chat_template_golden.json").read_text())


def template(name: str) -> str:
    if name == "smollm2":
        return gguf_file.read_gguf(weights.resolve_model("smollm2"), load_tensors=False).chat_template
    return (FIXTURES / "chat_templates" / f"{name}.jinja").read_text()


def tokenizer(name: str) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_file(str(TINY / "tokenizer.json"))
    return Tokenizer(backend, template(name), "<s>", "</s>", unk_token="<unk>")


@pytest.mark.parametrize("key", sorted(GOLDEN["renderings"]))
def test_rendered_as_transformers_renders_it(key):
    name, conversation, generation = key.split("/")
    conv = GOLDEN["conversations"][conversation]
    expected = GOLDEN["renderings"][key]
    render = lambda: tokenizer(name).apply_chat_template(conv["messages"], generation == "gen",  # noqa: E731
                                                         tools=conv.get("tools"))
    if "error" in expected:
        with pytest.raises(ValueError, match="chat template refused") as info:
            render()
        assert expected["error"] in str(info.value)
        return
    # strftime_now gives today's date: the golden text has the date it was made on.
    today = datetime.datetime.now().strftime(GOLDEN["date_format"])
    assert render() == expected["text"].replace(GOLDEN["date"], today)


def test_every_template_family_is_covered():
    names = {key.split("/")[0] for key in GOLDEN["renderings"]}
    assert names == {"llama3", "qwen2", "mistral", "smollm2"}
    assert any("日本語" in r.get("text", "") for r in GOLDEN["renderings"].values())  # non-ASCII kept


def test_template_variables_and_bad_tools():
    tok = tokenizer("llama3")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], date_string="01 Jan 2000")
    assert "Today Date: 01 Jan 2000" in text
    with pytest.raises(ValueError, match="tools='x' is invalid"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tools="x")


def test_llm_chat_passes_tools_and_template_variables(tiny_llm):
    """LLM.chat hands tools and chat_template_kwargs to the template (the tiny model's template
    ignores them, so the prompt is the plain one) and refuses a bad chat_template_kwargs."""
    from jaxserve import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=2)
    conv = [{"role": "user", "content": "hi"}]
    plain = tiny_llm.chat(conv, params, use_tqdm=False)[0]
    with_tools = tiny_llm.chat(conv, params, use_tqdm=False, tools=GOLDEN["conversations"]["tools"]["tools"],
                               chat_template_kwargs={"date_string": "x"})[0]
    assert with_tools.prompt == plain.prompt and with_tools.outputs[0].token_ids == plain.outputs[0].token_ids
    with pytest.raises(ValueError, match="chat_template_kwargs=3 is invalid"):
        tiny_llm.chat(conv, params, chat_template_kwargs=3)
