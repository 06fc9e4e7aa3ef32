"""The official `openai` Python package against a running `sprig serve` (crates/sprig-cli/tests/server.rs runs
this in a venv of its own): every call goes through the SDK, and the checks are on the objects it parses.

usage: openai_client.py BASE_URL API_KEY MODEL
"""

import json
import sys

import openai
from pydantic import BaseModel

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")


# Models.
ids = [m.id for m in client.models.list().data]
check("models.list", model in ids, ids)
check("models.retrieve", client.models.retrieve(model).id == model)

# Chat, greedy: the same answer twice; usage adds up.
msgs = [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colours."}]
a = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0)
b = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0)
choice = a.choices[0]
check("chat content", isinstance(choice.message.content, str) and choice.message.content.strip(), a)
check("chat role", choice.message.role == "assistant")
check("chat finish_reason", choice.finish_reason in ("stop", "length"), choice.finish_reason)
check("chat greedy is repeatable", a.choices[0].message.content == b.choices[0].message.content)
u = a.usage
check("chat usage", u.prompt_tokens > 0 and 0 < u.completion_tokens <= 24 and u.total_tokens == u.prompt_tokens + u.completion_tokens, u)
# The second request found the prompt cached (its own session, or the shared prefix cache).
check("chat cached tokens", b.usage.prompt_tokens_details.cached_tokens > 0, b.usage)

# Sampling with a seed: repeatable; max_completion_tokens honoured.
s1 = client.chat.completions.create(model=model, messages=msgs, max_completion_tokens=12, temperature=0.9, top_p=0.95, seed=42)
s2 = client.chat.completions.create(model=model, messages=msgs, max_completion_tokens=12, temperature=0.9, top_p=0.95, seed=42)
check("seeded sampling is repeatable", s1.choices[0].message.content == s2.choices[0].message.content)
check("max_completion_tokens", s1.usage.completion_tokens <= 12, s1.usage)

# Logit bias: +100 on one token makes greedy decoding pick it every time; penalties and stop are accepted.
forced = client.chat.completions.create(model=model, messages=msgs, max_tokens=3, temperature=0, logprobs=True,
                                        logit_bias={"1000": 100}, presence_penalty=0.1, frequency_penalty=0.1, stop=["\n\n"])
toks = [e.token for e in forced.choices[0].logprobs.content]
check("logit_bias", len(toks) == 3 and len(set(toks)) == 1 and forced.choices[0].message.content == toks[0] * 3, toks)

# Streaming: the deltas put together are the non-streamed answer; usage comes last.
chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("stream text", text == a.choices[0].message.content, (text, a.choices[0].message.content))
check("stream finish", [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length"))
check("stream usage", chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == a.usage.completion_tokens, chunks[-1])

# Log-probabilities: one entry per token, greedy picks the most likely one, alternatives sorted.
lp = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
entries = lp.choices[0].logprobs.content
check("logprobs count", len(entries) == lp.usage.completion_tokens, (len(entries), lp.usage))
for e in entries:
    check("logprob entry", e.logprob <= 0 and len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
          and all(x.logprob >= y.logprob for x, y in zip(e.top_logprobs, e.top_logprobs[1:])), e)
check("logprob text", "".join(e.token for e in entries) == lp.choices[0].message.content)

# Tools: a call comes back parsed; a tool message continues the turn.
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required", parallel_tool_calls=False,
                                   max_tokens=64, temperature=0)
calls = r.choices[0].message.tool_calls
check("tool call parsed", calls and calls[0].function.name == "get_weather", r)
args = json.loads(calls[0].function.arguments)
check("tool call arguments", isinstance(args.get("city"), str), args)
check("tool call finish_reason", r.choices[0].finish_reason == "tool_calls", r.choices[0].finish_reason)
turn = ask + [r.choices[0].message, {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"temp_c": 21, "sky": "clear"})}]
after = client.chat.completions.create(model=model, messages=turn, tools=tools, tool_choice="none", max_tokens=32, temperature=0)
check("tool result continues the turn", after.choices[0].message.content and not after.choices[0].message.tool_calls, after)
# A named function, streamed: the call arrives as tool_calls deltas.
named = {"type": "function", "function": {"name": "get_weather"}}
st = list(client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice=named, max_tokens=64, temperature=0, stream=True))
deltas = [tc for c in st if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
check("streamed tool call", deltas and deltas[0].function.name == "get_weather" and json.loads(deltas[0].function.arguments).get("city"), st)
check("streamed tool call finish", [c.choices[0].finish_reason for c in st if c.choices][-1] == "tool_calls")


# Structured output: a JSON schema, parsed by the SDK into a pydantic object.
class Person(BaseModel):
    name: str
    age: int


p = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Invent a person."}], response_format=Person,
                                  max_tokens=64, temperature=0)
person = p.choices[0].message.parsed
check("json_schema parsed", isinstance(person, Person) and isinstance(person.age, int), p)
j = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A JSON object about a cat."}],
                                   response_format={"type": "json_object"}, max_tokens=48, temperature=0)
if j.choices[0].finish_reason == "stop":
    check("json_object", isinstance(json.loads(j.choices[0].message.content), dict), j)

# Text completions, plain, with logprobs, streamed.
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
check("completion", c.choices[0].text and c.usage.completion_tokens <= 8, c)
check("completion logprobs", len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
      and "".join(c.choices[0].logprobs.tokens) == c.choices[0].text, c.choices[0].logprobs)
cs = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True))
check("completion stream", "".join(x.choices[0].text for x in cs if x.choices) == c.choices[0].text)
e = client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0, echo=True)
check("completion echo", e.choices[0].text.startswith("Hello"), e)

# Errors arrive as the SDK's typed exceptions.
def raises(name, exc, f):
    try:
        f()
    except exc as err:
        print(f"ok {name}: {type(err).__name__} {getattr(err, 'status_code', '')}")
        return err
    raise AssertionError(f"{name}: no {exc.__name__}")


raises("unknown model", openai.NotFoundError, lambda: client.chat.completions.create(model="no-such-model", messages=msgs))
raises("bad temperature", openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=msgs, temperature=5))
err = raises("context overflow", openai.BadRequestError,
             lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 40000}]))
check("context overflow code", err.code == "context_length_exceeded", err.body)
raises("bad schema", openai.BadRequestError, lambda: client.chat.completions.create(
    model=model, messages=msgs, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}))
wrong = openai.OpenAI(base_url=base_url, api_key=api_key + "x", max_retries=0)
raises("wrong api key", openai.AuthenticationError, lambda: wrong.models.list())
print("all ok")
