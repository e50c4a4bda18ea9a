"""GLM's cloze classification (glm.cloze): label scores against a hand loop over the model, batching, a tiny
task learned by cloze scoring and by a head, and every bad input's error."""
import random

import pytest
import torch

import glm
from glm.cloze import (
    ClassificationHead,
    ClozeTask,
    accuracy,
    check_texts,
    cloze_loss,
    head_logits,
    head_loss,
    head_predict,
    label_scores,
    predict,
)
from glm.errors import InputError
from glm.generate import encode_blank_text

# tokenizer family -> the tiny preset of a model of that release
PRESETS = {"glm": "tiny-glm", "chatglm": "tiny-chatglm", "chatglm2": "tiny-chatglm2", "chatglm3": "tiny-chatglm3",
           "glm4": "tiny-glm4-chatglm"}
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    from glm import corpus
    from glm.tokenizer import train

    d = tmp_path_factory.mktemp("cloze-corpus")
    train_file, _ = corpus.write_corpus(corpus.generate_corpus(seed=0, size="tiny"), str(d))
    return {fam: train([train_file], str(d / fam), vocab_size=400 if fam == "glm4" else 600, family=fam)
            for fam in PRESETS}


def model_for(tok, family: str, seed: int = 0, std: float = 0.3) -> glm.GLM:
    model = glm.GLM(glm.preset(PRESETS[family]).replace(vocab_size=tok.vocab_size)).eval()
    model.init_weights(std=std, seed=seed)
    return model


# ---------------------------------------------------------------------------------------------
# Scores against a hand loop: one forward per scored token, the layout written out from the references

def hand_scores(model, tok, family: str, template: str, text: str, verbalizers: list[str]) -> list[float]:
    """Teacher-forced log-probabilities summed token by token, each token its own forward of the
    sequence so far (no batching, no padding, no logits_at)."""
    rendered = template.replace("{text}", text)
    ids = encode_blank_text(tok, rendered)
    mask = tok.special_tokens["[MASK]"]
    m = ids.index(mask)
    verbal = [tok.encode(v) for v in verbalizers]
    single = all(len(v) == 1 for v in verbal)
    out = []
    for v in verbal:
        total = 0.0
        if model.config.position_streams == 2:
            # THUDM build_input_from_ids: [CLS] A <eos> for GLM; ChatGLM-6B's Part A is the text itself.
            part_a = [tok.cls_id, *ids, tok.eos_ids[0]] if family == "glm" else list(ids)
            A, slot = len(part_a), part_a.index(mask)
            targets = list(v) if single else [*v, tok.eop_id]
            for k, target in enumerate(targets):
                seq = part_a + [tok.sop_id] + list(v[:k])
                pos = list(range(A)) + [slot] * (k + 1)
                blk = [0] * A + list(range(1, k + 2))
                with torch.no_grad():
                    logits = model(torch.tensor([seq]), torch.tensor([[pos, blk]]), prefix_len=torch.tensor([A]),
                                   last_only=True)
                total += float(logits[0, -1].double().log_softmax(-1)[target])
        else:
            prompt = [tok.special_tokens["[gMASK]"], tok.sop_id, *ids[:m]]
            cont = [*v, *ids[m + 1:], tok.eos_ids[0]]
            for k, target in enumerate(cont):
                with torch.no_grad():
                    logits = model(torch.tensor([prompt + cont[:k]]), last_only=True)
                total += float(logits[0, -1].double().log_softmax(-1)[target])
        out.append(total)
    return out


@pytest.mark.parametrize("family,template", [
    ("glm", "{text} so it was [MASK]"),        # the blank ends the text: GLM keeps its <eos> after it
    ("glm", "[MASK]: {text}."),
    ("chatglm", "{text} so it was [MASK]."),
    ("chatglm3", "{text} so it was [MASK]."),  # text after the blank is scored too
    ("chatglm2", "[MASK]: {text}"),
    ("glm4", "{text} so it was[MASK]."),
])
def test_multi_token_scores_equal_a_hand_loop(toks, family, template):
    tok = toks[family]
    model = model_for(tok, family)
    words = [" good", " bad", " fine"] if family == "glm4" else ["good", "bad", "fine"]
    assert all(len(tok.encode(w)) > 1 for w in words)  # multi-token verbalizers (byte pieces)
    task = ClozeTask(template, labels=["p", "n", "m"], verbalizers=dict(zip(["p", "n", "m"], words)))
    texts = ["the cat sat on the mat", "Ada lives in Lima"]
    got = label_scores(model, tok, task, texts)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    for i, text in enumerate(texts):
        want = hand_scores(model, tok, family, template, text, words)
        assert torch.allclose(got[i].double(), torch.tensor(want, dtype=torch.float64), atol=ATOL), (got[i], want)


def single_token_words(tok, n: int) -> list[str]:
    words = [w for w in ("red", "blue", "black", "yellow", "white", "star", "square")
             if len(tok.encode(w)) == 1 and tok.encode(w)[0] not in tok.special_tokens.values()]
    assert len(words) >= n, words
    return words[:n]


@pytest.mark.parametrize("family", ["glm", "chatglm"])
def test_single_token_task_scores_the_sop_slot(toks, family):
    """THUDM's GLMForSingleTokenCloze: every verbalizer one token, so each label's score is its token's
    log-probability at <sop> (no <eop> scored)."""
    tok = toks[family]
    model = model_for(tok, family, seed=3)
    words = single_token_words(tok, 2)
    task = ClozeTask("{text} [MASK] here.", labels=["x", "y"], verbalizers=dict(zip(["x", "y"], words)))
    got = label_scores(model, tok, task, ["one two three"])
    want = hand_scores(model, tok, family, task.template, "one two three", words)
    assert torch.allclose(got[0].double(), torch.tensor(want, dtype=torch.float64), atol=ATOL)
    ids = [tok.encode(w)[0] for w in words]
    # One forward of Part A + <sop>: the two scores are the two tokens' log-probabilities at that slot.
    part_a = encode_blank_text(tok, "one two three [MASK] here.")
    if family == "glm":
        part_a = [tok.cls_id, *part_a, tok.eos_ids[0]]
    A, slot = len(part_a), part_a.index(tok.special_tokens["[MASK]"])
    with torch.no_grad():
        logits = model(torch.tensor([part_a + [tok.sop_id]]), torch.tensor([[list(range(A)) + [slot], [0] * A + [1]]]),
                       prefix_len=torch.tensor([A]), last_only=True)[0, -1].log_softmax(-1)
    assert torch.allclose(got[0], logits[ids], atol=ATOL)


@pytest.mark.parametrize("family", ["glm", "chatglm", "chatglm3", "glm4"])
def test_a_batch_scores_as_its_rows_alone(toks, family):
    """Rows of different lengths padded into one forward score as each (text, label) alone."""
    tok = toks[family]
    model = model_for(tok, family, seed=1)
    task = ClozeTask("{text}, it is [MASK].", labels=["a", "b"], verbalizers={"a": " yes", "b": " no at all"})
    texts = ["x", "Ada lives in Lima and her cat is grey", "12 + 30 = 42", "the"]
    batched = label_scores(model, tok, task, texts, batch_size=5)
    alone = torch.cat([label_scores(model, tok, task, [t], batch_size=1) for t in texts])
    assert torch.allclose(batched, alone, atol=ATOL), (batched - alone).abs().max()


def test_predict_is_the_softmax_of_the_scores(toks):
    tok = toks["glm"]
    model = model_for(tok, "glm")
    task = ClozeTask("{text} [MASK]", labels=["a", "b", "c"])
    probs = predict(model, tok, task, ["one", "two"])
    scores = label_scores(model, tok, task, ["one", "two"]).softmax(-1)
    assert [list(p) for p in probs] == [["a", "b", "c"]] * 2
    assert torch.allclose(torch.tensor([list(p.values()) for p in probs]), scores, atol=1e-6)
    assert abs(sum(probs[0].values()) - 1) < 1e-6


# ---------------------------------------------------------------------------------------------
# Learning a tiny task

CUES = {"pos": ["sun", "warm", "happy"], "neg": ["rain", "cold", "sad"]}
FILLER = ["the", "cat", "sat", "on", "mat", "Ada", "lives", "in", "Lima", "and", "her", "dog", "is", "grey", "today"]


def toy_rows(seed: int, n: int) -> tuple[list[str], list[str]]:
    """Texts of filler words with one cue word; the cue's group is the label (balanced)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = ("pos", "neg")[i % 2]
        words = rng.sample(FILLER, rng.randint(3, 6))
        words.insert(rng.randint(0, len(words)), rng.choice(CUES[label]))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def train_steps(params, loss_fn, texts, labels, steps: int, lr: float, batch: int = 16) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(0)
    losses = []
    for _ in range(steps):
        idx = rng.sample(range(len(texts)), batch)
        loss = loss_fn([texts[i] for i in idx], [labels[i] for i in idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("family", ["glm", "chatglm3"])
def test_cloze_training_learns_a_tiny_task(toks, family):
    """Cross entropy over the label scores goes down, and held-out accuracy beats the most frequent label."""
    tok = toks[family]
    torch.manual_seed(0)
    model = model_for(tok, family, seed=0, std=0.02).train()
    task = ClozeTask("{text}. It was [MASK].", labels=["pos", "neg"], verbalizers={"pos": "yes", "neg": "no"})
    train_texts, train_labels = toy_rows(0, 96)
    held_texts, held_labels = toy_rows(1, 40)
    before = accuracy(predict(model, tok, task, held_texts), held_labels)
    losses = train_steps(model.parameters(), lambda t, y: cloze_loss(model, tok, task, t, y), train_texts,
                         train_labels, steps=80, lr=3e-3)
    model.eval()
    after = accuracy(predict(model, tok, task, held_texts), held_labels)
    baseline = max(held_labels.count(y) for y in task.labels) / len(held_labels)
    # Chance is ln 2 = 0.69 once the two verbalizers' scores are balanced.
    assert mean(losses[-5:]) < 0.2 < mean(losses[:5]), losses
    assert after >= 0.9 > baseline, (before, after, baseline)


def test_head_training_learns_a_tiny_task(toks):
    tok = toks["glm"]
    torch.manual_seed(0)
    model = model_for(tok, "glm", seed=0, std=0.02).train()
    task = ClozeTask("{text} [MASK]", labels=["pos", "neg"])
    head = ClassificationHead(model.config.hidden_size, 2)
    train_texts, train_labels = toy_rows(0, 96)
    held_texts, held_labels = toy_rows(1, 40)
    losses = train_steps([*model.parameters(), *head.parameters()],
                         lambda t, y: head_loss(model, head, tok, task, t, y), train_texts, train_labels,
                         steps=80, lr=3e-3)
    model.eval()
    probs = head_predict(model, head, tok, task, held_texts)
    assert mean(losses[-5:]) < 0.2 < mean(losses[:5]), losses
    assert accuracy(probs, held_labels) >= 0.9 > max(held_labels.count(y) for y in task.labels) / len(held_labels)


@pytest.mark.parametrize("family", ["glm", "chatglm", "chatglm3"])
def test_head_reads_the_last_token_of_each_row(toks, family):
    """Left padding puts every text's last token in the last slot: a batch gives each text's logits alone."""
    tok = toks[family]
    model = model_for(tok, family, seed=2)
    task = ClozeTask("{text} [MASK]", labels=["a", "b", "c"])
    head = ClassificationHead(model.config.hidden_size, 3).eval()
    texts = ["x", "Ada lives in Lima and her cat is grey", "12 + 30 = 42"]
    with torch.no_grad():
        batched = head_logits(model, head, tok, task, texts)
        alone = torch.cat([head_logits(model, head, tok, task, [t]) for t in texts])
        ids = tok.build_inputs(tok.encode(texts[1]))
        kw = {"prefix_len": torch.tensor([len(ids)])} if model.config.position_streams == 2 else {}
        hidden = model(torch.tensor([ids]), return_hidden=True, **kw)[0, -1]
    assert batched.shape == (3, 3)
    assert torch.allclose(batched, alone, atol=ATOL)
    assert torch.allclose(batched[1], head(hidden), atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("kwargs,match", [
    (dict(template="It was [MASK].", labels=["a", "b"]), r"must contain \{text\}"),
    (dict(template="{text}", labels=["a", "b"]), "exactly one \\[MASK\\].*found 0"),
    (dict(template="{text} [MASK] [MASK]", labels=["a", "b"]), "exactly one \\[MASK\\].*found 2"),
    (dict(template="{text} [MASK] [gMASK]", labels=["a", "b"]), "holds \\[gMASK\\]"),
    (dict(template="{text} [MASK]", labels=["a"]), "at least two labels"),
    (dict(template="{text} [MASK]", labels="ab"), "at least two labels"),
    (dict(template="{text} [MASK]", labels=["a", "a", "b"]), "listed twice"),
    (dict(template="{text} [MASK]", labels=["a", ""]), "non-empty strings"),
    (dict(template="{text} [MASK]", labels=["a", "b"], verbalizers={"a": "yes"}), "label 'b' has no verbalizer"),
    (dict(template="{text} [MASK]", labels=["a", "b"], verbalizers={"a": "y", "b": "n", "c": "m"}), "not a label"),
    (dict(template="{text} [MASK]", labels=["a", "b"], verbalizers={"a": "y", "b": " "}), "non-empty text"),
])
def test_bad_tasks_are_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        ClozeTask(**kwargs)


def test_verbalizer_tokenizer_checks(toks, monkeypatch):
    tok = toks["glm"]
    model = model_for(tok, "glm")
    same = ClozeTask("{text} [MASK]", labels=["a", "b"], verbalizers={"a": "yes", "b": "yes"})
    with pytest.raises(InputError, match="'a' and 'b' have verbalizers with the same tokens"):
        label_scores(model, tok, same, ["x"])
    task = ClozeTask("{text} [MASK]", labels=["a", "b"], verbalizers={"a": "yes", "b": "\u200b"})
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: [] if text == "\u200b" else real(text))
    with pytest.raises(InputError, match="of label 'b' tokenizes to nothing"):
        predict(model, tok, task, ["x"])


@pytest.mark.parametrize("family", ["glm", "chatglm3"])
def test_bad_texts_and_labels_are_refused(toks, family):
    tok = toks[family]
    model = model_for(tok, family)
    task = ClozeTask("{text} [MASK]", labels=["a", "b"])
    with pytest.raises(InputError, match="text 1 contains a mask token"):
        label_scores(model, tok, task, ["fine", "a [MASK] here"])
    with pytest.raises(InputError, match="train.jsonl:7 contains a mask token"):
        check_texts(model, tok, task, ["ok", "x [gMASK]"], names=["train.jsonl:3", "train.jsonl:7"])
    long = " ".join(["word"] * 200)
    with pytest.raises(InputError, match="text 0 is .* more than the model's 6[45] positions"):
        label_scores(model, tok, task, [long])
    with pytest.raises(InputError, match="list of strings"):
        label_scores(model, tok, task, "just one text")
    with pytest.raises(InputError, match="texts is empty"):
        predict(model, tok, task, [])
    with pytest.raises(InputError, match="example 1: label 'c' is not one of"):
        cloze_loss(model, tok, task, ["x", "y"], ["a", "c"])
    with pytest.raises(InputError, match="one label per text"):
        cloze_loss(model, tok, task, ["x", "y"], ["a"])
    with pytest.raises(InputError, match="batch_size"):
        label_scores(model, tok, task, ["x"], batch_size=0)
    head = ClassificationHead(model.config.hidden_size, 3)
    with pytest.raises(InputError, match="3 outputs but the task 2 labels"):
        head_loss(model, head, tok, task, ["x"], ["a"])
    with pytest.raises(InputError, match="reads 32 hidden features"):
        head_predict(model, ClassificationHead(32, 2), tok, task, ["x"])
    with pytest.raises(InputError, match="text 0 is .* more than the model's"):
        head_predict(model, ClassificationHead(model.config.hidden_size, 2), tok, task, [long])


def test_accuracy():
    assert accuracy(["a", "b", "a"], ["a", "a", "a"]) == pytest.approx(2 / 3)
    assert accuracy([{"a": 0.2, "b": 0.8}, {"a": 0.6, "b": 0.4}], ["b", "b"]) == 0.5
    with pytest.raises(InputError, match="2 predictions for 1 labels"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(InputError, match="non-empty list of labels"):
        accuracy([], [])
    with pytest.raises(InputError, match="whole number"):
        ClassificationHead(64, 0)
