"""The OpenAI-compatible server against the real ``openai`` client and ``httpx``: outputs equal
``LLM.generate`` (the oracle, on its own copy of the model), streams concatenate to the
whole text, errors name the field, and faults stay with the request that caused them."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from _serving import metric, tiny_llm, wait_idle

from decodekit import SamplingParams, SteeringVector
from decodekit.serving import Server

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["w5 w6 w7", "w9 w10 w11 w12 w13", "w40"]


@pytest.fixture(scope="module")
def oracle():
    return tiny_llm()


@pytest.fixture(scope="module")
def steering_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("steering")


@pytest.fixture(scope="module")
def server(steering_dir):
    with Server(tiny_llm(), port=0, model_name="tiny", steering_dir=steering_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def offline(oracle, prompt, **kw):
    return oracle.generate(prompt, SamplingParams(**kw))[0]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_equals_llm_generate_and_stream_concatenates(server, client, oracle, prompt):
    want = offline(oracle, prompt, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=11)
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0.8, top_p=0.9,
                                    seed=11)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0.8,
                                            top_p=0.9, seed=11, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [want.finish_reason]


def test_chat_equals_llm_generate_streamed_and_not(client, oracle):
    messages = [{"role": "system", "content": "w8 w9"}, {"role": "user", "content": "w20 w21 w22"}]
    want = offline(oracle, messages, max_new_tokens=10, temperature=0.7, seed=5)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.7,
                                         seed=5)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                 temperature=0.7, seed=5, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text
    assert stream[-1].choices[0].finish_reason == want.finish_reason


def test_several_prompts_and_n_samples(client, oracle):
    want = oracle.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6, n=2, seed=3))
    got = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=6, n=2, seed=3)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [o.text for w in want for o in w.outputs]
    assert got.usage.completion_tokens == sum(len(o.token_ids) for w in want for o in w.outputs)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=6, n=2, seed=3,
                                            stream=True))
    texts = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert [texts[i] for i in range(4)] == [o.text for w in want for o in w.outputs]


def test_stop_strings_and_extras_through_extra_body(client, oracle):
    base = offline(oracle, "w5 w6 w7", max_new_tokens=12, temperature=0)
    stop = base.text.split()[3]
    want = offline(oracle, "w5 w6 w7", max_new_tokens=12, temperature=0, stop=[stop])
    got = client.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=12, temperature=0,
                                    stop=[stop])
    assert got.choices[0].text == want.text and stop not in got.choices[0].text
    assert got.choices[0].finish_reason == "stop"
    extras = dict(top_k=20, min_p=0.05, typical_p=0.95, repetition_penalty=1.3, min_tokens=4,
                  stop_token_ids=[17], ignore_eos=True)
    want = offline(oracle, "w9 w10", max_new_tokens=9, seed=2, top_k=20, min_p=0.05, typical_p=0.95,
                   repetition_penalty=1.3, min_new_tokens=4, stop_token_ids=[17], ignore_eos=True,
                   presence_penalty=0.5, frequency_penalty=0.3, logit_bias={5: 3.0})
    got = client.completions.create(model="tiny", prompt="w9 w10", max_tokens=9, seed=2, presence_penalty=0.5,
                                    frequency_penalty=0.3, logit_bias={"5": 3.0}, extra_body=extras)
    assert got.choices[0].text == want.text
    plain = offline(oracle, "w9 w10", max_new_tokens=9, seed=2)
    assert plain.text != want.text  # the extras change the output (they are not ignored)


def test_logprobs_equal_llm_generate(client, oracle):
    want = offline(oracle, "w5 w6", max_new_tokens=5, seed=1, logprobs=3)
    got = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=5, seed=1, logprobs=3)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x.token_log_probabilities[0] for x in want.logprobs], abs=1e-5)
    assert [len(t) for t in lp.top_logprobs] == [3] * 5
    assert lp.tokens == [oracle.tokenizer.decode([t]) for t in want.token_ids]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5 w6"}],
                                          max_tokens=4, seed=1, logprobs=True, top_logprobs=2)
    want = offline(oracle, [{"role": "user", "content": "w5 w6"}], max_new_tokens=4, seed=1, logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(
        [x.token_log_probabilities[0] for x in want.logprobs], abs=1e-5)
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_steering_and_guided_extras(client, oracle, steering_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({0: 0.8 * torch.randn(64, generator=g), 1: 0.8 * torch.randn(64, generator=g)})
    path = steering_dir / "vec.safetensors"
    vec.save(path)
    want = oracle.generate("w5 w6", SamplingParams(max_new_tokens=8, temperature=0),
                           steering_vector=str(path), steering_strength=3.0)[0]
    got = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=8, temperature=0, extra_body={
        "steering": {"vector": "vec.safetensors", "strength": 3.0}})
    assert got.choices[0].text == want.text
    want = oracle.generate("w5 w6", SamplingParams(max_new_tokens=8, temperature=0),
                           steering_vector=str(path), steering_strength=3.0,
                           steering_positions=slice(0, 3))[0]
    got = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=8, temperature=0, extra_body={
        "steering": {"vector": "vec.safetensors", "strength": 3.0, "positions": [0, 3]}})
    assert got.choices[0].text == want.text
    outside = tmp_path / "elsewhere.safetensors"  # a file outside the steering folder is not served
    vec.save(outside)
    for name in (str(outside), "../" + outside.name, "nope.safetensors"):
        with pytest.raises(openai.BadRequestError, match="no such file in the steering directory"):
            client.completions.create(model="tiny", prompt="w5", max_tokens=2,
                                      extra_body={"steering": {"vector": name}})
    assert want.text != offline(oracle, "w5 w6", max_new_tokens=8, temperature=0).text
    regex = "(w1[0-9][0-9]){3}"  # the matcher spells tokens by their vocabulary strings (no spaces)
    want = oracle.generate("w5 w6", SamplingParams(max_new_tokens=8, seed=4), regex_pattern=regex)[0]
    got = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=8, seed=4,
                                    extra_body={"guided_regex": regex})
    assert got.choices[0].text == want.text
    assert [100 <= t < 200 for t in want.token_ids[:3]] == [True] * 3 and want.finish_reason == "stop"


@pytest.mark.parametrize("body,field", [
    ({"prompt": "w5", "temperature": -1}, "temperature"),
    ({"prompt": "w5", "top_p": 0}, "top_p"),
    ({"prompt": "w5", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "w5", "n": 1000}, "n"),
    ({"prompt": "w5", "logprobs": 50}, "logprobs"),
    ({"prompt": "w5", "seed": -3}, "seed"),
    ({"prompt": "w5", "stop": [""]}, "stop"),
    ({"prompt": "w5", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "w5", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "w5", "temperature": "hot"}, "temperature"),
    ({"prompt": "w5", "bogus": 1}, "bogus"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "w5", "steering": {"preset": "nope"}}, None),
    ({"prompt": "w5", "lora": "nope"}, None),
    ({"prompt": "w5", "best_of": 3, "n": 1, "stream": True}, "best_of"),
])
def test_bad_parameters_are_400_naming_the_field(server, body, field):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if field is not None:
        assert err["param"] == field and field in err["message"]
    else:
        assert any(k in err["message"] for k in ("steering", "preset", "lora"))
    wait_idle(server)


def test_prompt_too_long_unknown_model_and_routes(server, client):
    with pytest.raises(openai.BadRequestError, match="max_seq_len|too long|tokens"):
        client.completions.create(model="tiny", prompt=" ".join(["w7"] * 400), max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="w5", max_tokens=2)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    big = {"model": "tiny", "prompt": "w5 " * (3 << 20)}
    r = httpx.post(server.url + "/v1/completions", json=big, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_api_key_guards_v1_routes_only(oracle):
    with Server(tiny_llm(max_batch_size=2), port=0, model_name="tiny", api_key="s3cret") as srv:
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        got = good.completions.create(model="tiny", prompt="w5", max_tokens=3, temperature=0)
        assert got.choices[0].text == offline(oracle, "w5", max_new_tokens=3, temperature=0).text
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="w5", max_tokens=3)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "w5"}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 200


def _stream_then_drop(url: str, body: dict, chunks: int = 1) -> None:
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= chunks:
                break


def test_disconnects_cancel_the_request_and_free_its_slot(server):
    before = metric(httpx.get(server.url + "/metrics").text, "decodekit_request_cancellations_total")
    body = {"model": "tiny", "prompt": "w5 w6", "max_tokens": 150, "ignore_eos": True, "stream": True}
    _stream_then_drop(server.url, body)
    wait_idle(server, 5)
    threads = [threading.Thread(target=_stream_then_drop, args=(server.url, body)) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_idle(server, 20)
    payload = json.dumps(dict(body, stream=False)).encode()  # a non-streamed request whose client leaves
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        deadline = time.monotonic() + 10
        while server.engine.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.running == 1
        running = httpx.get(server.url + "/metrics").text
        assert metric(running, "decodekit_requests_running") == 1
        assert metric(running, "decodekit_kv_cache_usage") > 0
    wait_idle(server, 5)
    after = metric(httpx.get(server.url + "/metrics").text, "decodekit_request_cancellations_total")
    assert after - before == 52


def test_a_request_that_fails_mid_batch_fails_alone(oracle):
    llm = tiny_llm(max_batch_size=4)
    make = llm.new_requests

    def new_requests(prompts, params, **options):  # the request asking for 13 tokens breaks at its 5th
        groups = make(prompts, params, **options)
        if params.max_new_tokens == 13:
            def broken(inputs):
                if len(inputs.token_ids) >= 7:
                    raise RuntimeError("steering vector exploded")
            for g in groups:
                for c in g.contexts:
                    c.logits_processors = (broken,)
        return groups

    llm.new_requests = new_requests
    with Server(llm, port=0, model_name="tiny") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        results, errors = {}, {}

        def run(i, n):
            try:
                results[i] = client.completions.create(model="tiny", prompt=PROMPTS[i % 3], max_tokens=n,
                                                       seed=i).choices[0].text
            except openai.APIStatusError as e:
                errors[i] = e
        threads = [threading.Thread(target=run, args=(i, 13 if i == 2 else 20)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(errors) == {2} and errors[2].status_code == 500
        assert "steering vector exploded" in errors[2].message
        for i in (0, 1, 3):
            assert results[i] == offline(oracle, PROMPTS[i % 3], max_new_tokens=20, seed=i).text
        wait_idle(srv)
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "decodekit_request_failures_total") == 1
        assert metric(text, "decodekit_requests_total", 'finish_reason="length"') == 3


def test_queue_overflow_is_429_then_recovers(oracle):
    with Server(tiny_llm(max_batch_size=1), port=0, model_name="tiny", max_waiting=2) as srv:
        codes, lock = [], threading.Lock()

        def run():
            r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "w5", "max_tokens": 60, "ignore_eos": True})
            with lock:
                codes.append((r.status_code, r.headers.get("retry-after")))
        threads = [threading.Thread(target=run) for _ in range(12)]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join()
        assert sum(c == 200 for c, _ in codes) >= 3
        refused = [(c, ra) for c, ra in codes if c != 200]
        assert refused and all(c == 429 and ra == "1" for c, ra in refused)
        wait_idle(srv)
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "w5", "max_tokens": 4,
                                                           "temperature": 0}, timeout=30)
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == offline(oracle, "w5", max_new_tokens=4, temperature=0).text
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "decodekit_request_rejections_total", 'reason="queue_full"') == len(refused)


def test_error_bodies_are_openai_shaped(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    nan = json.dumps({"prompt": "w5", "temperature": float("nan")})  # NaN: not JSON, but Python writes it
    r = httpx.post(server.url + "/v1/completions", content=nan, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_lora_and_prompt_logprobs(tmp_path):
    """An adapter picked per request (peft's model is the oracle of its greedy tokens), and
    prompt logprobs equal to ``LLM.generate``'s."""
    from _models import tiny_model
    from _peft import save_adapter

    peft_model = save_adapter(tiny_model("llama"), tmp_path / "a", 1, std=0.08, r=8,
                              target_modules=["q_proj", "v_proj"])
    llm = tiny_llm(max_batch_size=4, max_loras=1)
    assert llm.generator.load_lora("a", str(tmp_path / "a")).ok
    oracle = tiny_llm(max_batch_size=2)
    with Server(llm, port=0, model_name="tiny") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        got = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                        extra_body={"lora": "a", "ignore_eos": True})
        ids = torch.tensor([[5, 6, 7]])
        with torch.no_grad():
            want = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=8, min_new_tokens=8, pad_token_id=0)[0, 3:].tolist()
        assert got.choices[0].text.split() == oracle.tokenizer.decode(want).split()
        plain = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert plain.choices[0].text != got.choices[0].text
        with pytest.raises(openai.BadRequestError, match="lora"):
            client.completions.create(model="tiny", prompt="w5", max_tokens=4, extra_body={"lora": "b"})
        r = httpx.post(srv.url + "/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": "w5 w6", "max_tokens": 4, "prompt_logprobs": 2, "temperature": 0})
        entries = r.json()["choices"][0]["prompt_logprobs"]
        want = oracle.generate("w5 w6", SamplingParams(max_new_tokens=4, temperature=0, prompt_logprobs=2))[0]
        assert entries[0] is None and len(entries) == 2
        assert entries[1]["6"]["logprob"] == pytest.approx(want.prompt_logprobs[1].token_log_probabilities[0],
                                                           abs=1e-5)


def test_chat_without_max_tokens_generates_until_the_context_is_full(client, oracle, server):
    messages = [{"role": "user", "content": "w30 w31"}]
    got = client.chat.completions.create(model="tiny", messages=messages, seed=9,
                                         extra_body={"ignore_eos": True})
    room = server.engine.gen.max_seq_len - got.usage.prompt_tokens
    want = offline(oracle, messages, max_new_tokens=room, seed=9, ignore_eos=True)
    assert got.usage.completion_tokens == room and got.choices[0].finish_reason == "length"
    assert got.choices[0].message.content == want.text
