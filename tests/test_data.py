"""Tests for peft_personamux.data: loaders on fixtures in the real formats, errors, splits and text personas."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from datasets import Dataset
from tiny_models import small_llama

from peft_personamux.data import (
    DataFileNotFoundError,
    DataFormatError,
    amazon,
    describe_personas,
    load_amazon_reviews,
    load_cornell,
    load_shakespeare,
    load_tweets,
    spherical_kmeans,
    split_persona_examples,
    split_personas,
    summarize,
)
from peft_personamux.data.shakespeare import parse_play

COLUMNS = ["persona", "prompt", "response", "group"]
PERSONA_RE = re.compile(r"^[a-z0-9][a-z0-9_]*/[a-z0-9][a-z0-9_]*$")
SEP = " +++$+++ "


def check_layout(ds: Dataset) -> None:
    assert ds.column_names == COLUMNS
    assert all(ds.features[c].dtype == "string" for c in COLUMNS)
    assert all(PERSONA_RE.match(p) for p in set(ds["persona"][:]))
    assert all(ds["prompt"][:]) and all(ds["response"][:])


# --- Cornell ---------------------------------------------------------------------------------------------------

# (movie, character id, name, utterances of one conversation alternating with the other character)
CONVERSATIONS = [
    ("m0", ("u0", "BIANCA"), ("u2", "CAMERON"), ["Can we make this quick?", "Well, I thought we'd start.", "Not the"]),
    ("m0", ("u2", "CAMERON"), ("u0", "BIANCA"), ["You're asking me out.", "No.", "That's so cute.", "Forget it."]),
    ("m0", ("u0", "BIANCA"), ("u2", "CAMERON"), ["Gosh, if only we could find Kat a boyfriend...", "Let me see."]),
    ("m1", ("u10", "JOSÉ"), ("u11", "ANNA"), ["Un café, s'il vous plaît.", "Tout de suite.", "Merci, très bien."]),
    ("m1", ("u11", "ANNA"), ("u10", "JOSÉ"), ["Où est la gare?", "Là-bas.", "Merci.", "De rien, vraiment."]),
]


def write_cornell_original(root, conversations=CONVERSATIONS):
    root.mkdir(parents=True, exist_ok=True)
    lines, convs, characters = [], [], {}
    number = 100
    for movie, first, second, texts in conversations:
        ids = []
        for i, text in enumerate(texts):
            char_id, name = (first, second)[i % 2]
            characters[char_id] = (name, movie)
            ids.append(f"L{number}")
            lines.append(SEP.join([f"L{number}", char_id, movie, name, text]))
            number += 1
        convs.append(SEP.join([first[0], second[0], movie, repr(ids)]))
    metadata = [SEP.join([c, name, movie, "a title", "?", "?"]) for c, (name, movie) in characters.items()]
    # The release lists lines newest first and is Latin-1 encoded.
    (root / "movie_lines.txt").write_bytes(("\n".join(reversed(lines)) + "\n").encode("latin-1"))
    (root / "movie_conversations.txt").write_bytes(("\n".join(convs) + "\n").encode("latin-1"))
    (root / "movie_characters_metadata.txt").write_bytes(("\n".join(metadata) + "\n").encode("latin-1"))
    return root


def write_convokit(root, conversations=CONVERSATIONS):
    root.mkdir(parents=True, exist_ok=True)
    utterances, speakers = [], {}
    number = 100
    for movie, first, second, texts in conversations:
        conversation_id, previous = f"L{number}", None
        for i, text in enumerate(texts):
            char_id, name = (first, second)[i % 2]
            speakers[char_id] = {"meta": {"character_name": name, "movie_idx": movie}, "vectors": []}
            utterance_id = f"L{number}"
            meta = {"movie_id": movie, "parsed": []}
            utterances.append(
                {"id": utterance_id, "conversation_id": conversation_id, "text": text, "speaker": char_id}
                | {"meta": meta, "reply_to": previous, "timestamp": None, "vectors": []}
            )
            previous, number = utterance_id, number + 1
    (root / "utterances.jsonl").write_text("".join(json.dumps(u) + "\n" for u in utterances), encoding="utf-8")
    (root / "speakers.json").write_text(json.dumps(speakers), encoding="utf-8")
    return root


def test_cornell_original_release(tmp_path):
    write_cornell_original(tmp_path / "cornell movie-dialogs corpus")  # the folder the release zip unpacks into
    ds = load_cornell(tmp_path, min_lines=2)
    check_layout(ds)
    counts = dict(zip(*np.unique(ds["persona"][:], return_counts=True)))
    assert counts == {"m0/bianca": 3, "m0/cameron": 3, "m1/anna": 2, "m1/jose": 3}
    assert set(ds["group"][:]) == {"m0", "m1"}
    row = ds[ds["response"][:].index("Tout de suite.")]
    assert row["prompt"] == "Un café, s'il vous plaît." and row["persona"] == "m1/anna"  # Latin-1 decoded
    assert summarize(load_cornell(tmp_path, min_lines=3))["personas"] == 3


def test_cornell_convokit_matches_original(tmp_path):
    original = load_cornell(write_cornell_original(tmp_path / "original"), min_lines=1)
    convokit = load_cornell(write_convokit(tmp_path / "convokit"), min_lines=1)
    check_layout(convokit)
    assert convokit.to_list() == original.to_list()


def test_cornell_convokit_without_speakers_uses_ids(tmp_path):
    root = write_convokit(tmp_path)
    (root / "speakers.json").unlink()
    assert set(load_cornell(root, min_lines=1)["persona"]) == {"m0/u0", "m0/u2", "m1/u10", "m1/u11"}


def test_cornell_missing_files(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="movie_lines.txt.*utterances.jsonl"):
        load_cornell(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_cornell(tmp_path / "nowhere")
    root = write_cornell_original(tmp_path / "c")
    (root / "movie_conversations.txt").unlink()
    with pytest.raises(DataFormatError, match="movie_conversations.txt"):
        load_cornell(root)


def test_cornell_malformed_lines(tmp_path):
    root = write_cornell_original(tmp_path)
    path = root / "movie_lines.txt"
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"L999 +++$+++ u0 +++$+++ m0"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataFormatError, match=r"movie_lines\.txt, line 3: expected 5 fields"):
        load_cornell(root)

    root = write_cornell_original(tmp_path / "bad_list")
    path = root / "movie_conversations.txt"
    path.write_text(path.read_text(encoding="latin-1").replace("['L103'", "[L103"), encoding="latin-1")
    with pytest.raises(DataFormatError, match=r"movie_conversations\.txt, line 2: expected a list of line ids"):
        load_cornell(root)

    root = write_cornell_original(tmp_path / "dangling")
    path = root / "movie_conversations.txt"
    path.write_text(path.read_text(encoding="latin-1").replace("'L105'", "'L9999'"), encoding="latin-1")
    with pytest.raises(DataFormatError, match=r"line 2: expected line ids present in movie_lines\.txt.*L9999"):
        load_cornell(root)

    root = write_convokit(tmp_path / "convokit")
    path = root / "utterances.jsonl"
    rows = path.read_text().splitlines()
    rows[1] = rows[1][:-5]
    path.write_text("\n".join(rows))
    with pytest.raises(DataFormatError, match=r"utterances\.jsonl, line 2: expected one JSON object per line"):
        load_cornell(root)


# --- tweets ----------------------------------------------------------------------------------------------------


def write_tweets(path, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "author", "text"])
        writer.writerows(rows)
    return path


def test_tweets(tmp_path):
    rows = [(i, "Ada Lovelace", f"Loving the new #Engine design, note {i} https://t.co/x") for i in range(4)]
    rows += [(10 + i, "grace", f"@ada The compiler,\nit works!   Ship it {i} &amp; go") for i in range(3)]
    rows += [(20, "lurker", "only once"), (21, "grace", "  "), (22, "東京", "こんにちは")]
    ds = load_tweets(write_tweets(tmp_path / "tweets.csv", rows), min_lines=2)
    check_layout(ds)
    stats = {"examples": 7, "personas": 2, "groups": 2, "min_lines": 3, "median_lines": 3.5, "max_lines": 4}
    assert summarize(ds) == stats
    ada = ds.filter(lambda r: r["persona"] == "tweets/ada_lovelace")
    assert set(ada["group"][:]) == {"ada_lovelace"}
    assert ada[0]["prompt"] == "Topic: #engine"
    assert ada[0]["response"] == "Loving the new #Engine design, note 0 https://t.co/x"
    grace = ds.filter(lambda r: r["persona"] == "tweets/grace")
    assert grace[0]["prompt"] == "Topic: compiler works ship go"
    assert grace[0]["response"] == "@ada The compiler, it works! Ship it 0 & go"
    few = load_tweets(tmp_path / "tweets.csv", min_lines=1, max_per_author=2)
    tokyo = few[few["response"][:].index("こんにちは")]
    assert len(few) == 6 and re.fullmatch(r"author_[0-9a-f]{8}", tokyo["group"])
    assert tokyo["prompt"] == "Topic: anything"


def test_tweets_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tweets.csv"):
        load_tweets(tmp_path / "tweets.csv")
    path = write_tweets(tmp_path / "tweets.csv", [(1, "a", "hello")])
    with pytest.raises(DataFormatError, match=r"line 1: expected a header with columns \['user'\].*author_column="):
        load_tweets(path, author_column="user")
    path.write_text("id,author,text\n1,a,hello\n2,b\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"tweets\.csv, line 3: expected 3 fields"):
        load_tweets(path)


# --- Amazon ----------------------------------------------------------------------------------------------------


def write_amazon(path, num_users=16, reviews_per_user=6, seed=0):
    """Two communities of users buying from disjoint halves of the catalogue."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(num_users):
        community = user % 2
        items = rng.choice(10, size=reviews_per_user, replace=False)
        for t, item in enumerate(items):
            review = {"rating": 5.0, "title": f"Title {community}-{item}", "text": f"by user{user}<br />Great."}
            review |= {"asin": "x", "parent_asin": f"B{community}{item:02d}", "user_id": f"USER{user}"}
            review |= {"timestamp": 1_600_000_000_000 + 1000 * t, "helpful_vote": 0, "verified_purchase": True}
            lines.append(json.dumps(review))
    lines.append(json.dumps({"user_id": "ONCE", "parent_asin": "B000", "title": "t", "text": "x", "timestamp": 1}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_amazon_clusters_follow_purchases(tmp_path):
    path = write_amazon(tmp_path / "reviews.jsonl")
    ds = load_amazon_reviews(path, num_clusters=2, seed=0, min_reviews=3)
    check_layout(ds)
    assert len(ds) == 16 * 6  # the one-review user is dropped
    assert set(ds["persona"][:]) == {"amazon/cluster_0", "amazon/cluster_1"}
    assert ds["group"][:] == ds["persona"][:]
    persona_of_user = {}
    for row in ds:
        user = int(re.search(r"by user(\d+)", row["response"])[1])
        assert persona_of_user.setdefault(user, row["persona"]) == row["persona"]  # a user is in one cluster
    assert len({persona_of_user[u] for u in range(0, 16, 2)}) == 1  # communities are recovered
    assert len({persona_of_user[u] for u in range(1, 16, 2)}) == 1
    first = ds[0]
    assert first["prompt"].startswith("Previously reviewed: ")
    assert first["response"].startswith("Title ") and "<br" not in first["response"]
    assert load_amazon_reviews(path, num_clusters=2, seed=0, min_reviews=3).to_list() == ds.to_list()


def test_amazon_meta_titles(tmp_path):
    path = write_amazon(tmp_path / "reviews.jsonl")
    meta = tmp_path / "meta.jsonl"
    items = [f"B{c}{i:02d}" for c in range(2) for i in range(10)]
    meta.write_text("".join(json.dumps({"parent_asin": a, "title": f"Item {a}"}) + "\n" for a in items))
    ds = load_amazon_reviews(path, num_clusters=3, min_reviews=3, meta_path=str(meta), history=2)
    later = [p for p in ds["prompt"][:] if "nothing yet" not in p]
    assert all(
        re.fullmatch(r"Previously reviewed: Item B\d+(; Item B\d+)?\nNow reviewing: Item B\d+", p) for p in later
    )


def test_amazon_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reviews.jsonl"):
        load_amazon_reviews(tmp_path / "reviews.jsonl")
    path = write_amazon(tmp_path / "reviews.jsonl")
    with pytest.raises(ValueError, match="num_clusters.*lower num_clusters or min_reviews"):
        load_amazon_reviews(path, num_clusters=100, min_reviews=3)
    rows = path.read_text().splitlines()
    rows[1] = json.dumps({"user_id": "U", "title": "t", "text": "x", "timestamp": 1})
    path.write_text("\n".join(rows))
    with pytest.raises(DataFormatError, match=r"reviews\.jsonl, line 2: .*missing or mistyped \['parent_asin'\]"):
        load_amazon_reviews(path, num_clusters=2, min_reviews=3)


def test_randomized_svd_matches_dense(monkeypatch):
    rng = np.random.default_rng(0)
    sequences = [rng.choice(30, size=8, replace=False) + 30 * (i % 2) for i in range(40)]
    rows, cols, values = amazon.item_cooccurrence_ppmi(sequences, 60, window=3)
    assert np.allclose(np.sort(rows * 60 + cols), np.sort(cols * 60 + rows)) and (values > 0).all()
    dense = amazon.truncated_svd_embedding(rows, cols, values, 60, dim=2)  # the two communities: a clear gap
    monkeypatch.setattr(amazon, "_DENSE_SVD_MAX_ITEMS", 0)
    randomized = amazon.truncated_svd_embedding(rows, cols, values, 60, dim=2, seed=0)
    assert np.allclose(dense @ dense.T, randomized @ randomized.T, atol=1e-2)  # equal up to signs and rotation


def test_spherical_kmeans():
    rng = np.random.default_rng(0)
    directions = np.eye(3)
    x = np.concatenate([d * rng.uniform(1, 5, (20, 1)) + 0.05 * rng.standard_normal((20, 3)) for d in directions])
    labels = spherical_kmeans(x, 3, seed=1)
    assert all(len(set(labels[i : i + 20])) == 1 for i in (0, 20, 40)) and len(set(labels)) == 3
    assert np.array_equal(labels, spherical_kmeans(x, 3, seed=1))
    with pytest.raises(ValueError, match="num_clusters"):
        spherical_kmeans(x, 61)


# --- Shakespeare -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare():
    return load_shakespeare()


def test_shakespeare_real_plays(shakespeare):
    check_layout(shakespeare)
    counts = dict(zip(*np.unique(shakespeare["persona"][:], return_counts=True)))
    assert counts["hamlet/hamlet"] > 300
    assert {"macbeth/lady_macbeth", "romeo_and_juliet/romeo", "othello/iago"} <= counts.keys()
    assert min(counts.values()) >= 40
    assert shakespeare["group"][:] == [p.split("/")[0] for p in shakespeare["persona"][:]]
    assert len(set(shakespeare["group"][:])) > 30 and "hamlet" in shakespeare["group"][:]
    for text in shakespeare["prompt"][:] + shakespeare["response"][:]:
        assert len(text) <= 400 and not re.search(r"[_*\[\]\\#]|\s\s", text), text
    assert not any(r.startswith("Enter") or r in ("Exit", "Exeunt") for r in shakespeare["response"][:])


def test_parse_play_format():
    play = "\n".join(
        [
            "# A Play",
            "## ACT I",
            "### SCENE I. A room.",
            "_Enter ALPHA and",
            "BETA_",
            "**ALPHA**  ",
            "Hello there,  ",
            "_\\[Aside]_  ",
            "friend of mine.",
            "",
            "*Exit.*",
            "",
            "Still me, after a pause.",
            "",
            "LADY",
            "",
            "**BETA**  ",
            "Good \\-- day &amp; _\\[Kneeling]_ night.",
            "### SCENE II. Another room.",
            "**GAMMA**",
            "New scene.",
        ]
    )
    assert parse_play(play) == [
        (3, "ALPHA", "Hello there, friend of mine. Still me, after a pause."),
        (3, "LADY BETA", "Good -- day & night."),
        (4, "GAMMA", "New scene."),
    ]


def test_shakespeare_plays_dir(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="<play>.md"):
        load_shakespeare(plays_dir=str(tmp_path))
    speeches = [
        f"**{'ALPHA' if i % 2 else 'BETA OF YORK'}**  \nLine number {i} and more words here." for i in range(9)
    ]
    (tmp_path / "tragedies").mkdir()
    (tmp_path / "tragedies" / "my-play.md").write_text("# My Play\n\n### SCENE I\n\n" + "\n\n".join(speeches))
    ds = load_shakespeare(min_lines=4, max_chars=20, plays_dir=str(tmp_path))
    assert set(ds["persona"][:]) == {"my_play/alpha", "my_play/beta_of_york"} and set(ds["group"][:]) == {"my_play"}
    assert ds[0] == {
        "persona": "my_play/alpha",
        "prompt": "Line number 0 and",
        "response": "Line number 1 and",
        "group": "my_play",
    }
    with pytest.raises(ValueError, match="min_lines"):
        load_shakespeare(min_lines=0)


# --- splits ----------------------------------------------------------------------------------------------------


def toy_dataset(num_groups=12, personas_per_group=3, lines=(5, 40)):
    rng = np.random.default_rng(0)
    rows = []
    for g in range(num_groups):
        for p in range(personas_per_group):
            for i in range(rng.integers(*lines)):
                rows.append({"persona": f"g{g}/p{p}", "prompt": "q", "response": f"g{g}/p{p}#{i}", "group": f"g{g}"})
    return Dataset.from_list(rows)


def test_split_personas_keeps_groups_whole(shakespeare):
    for ds in (toy_dataset(), shakespeare):
        pretrain, unseen = split_personas(ds, pretrain_fraction=0.9, seed=0)
        assert not set(pretrain["group"][:]) & set(unseen["group"][:])
        assert len(pretrain) + len(unseen) == len(ds)
        personas_per_group = {}
        for persona, group in zip(ds["persona"][:], ds["group"][:]):
            personas_per_group.setdefault(group, set()).add(persona)
        n_unseen, n_total = len(set(unseen["persona"][:])), len(set(ds["persona"][:]))
        assert 0.1 * n_total <= n_unseen < 0.1 * n_total + max(map(len, personas_per_group.values()))
        again = split_personas(ds, pretrain_fraction=0.9, seed=0)
        assert again[0]["response"][:] == pretrain["response"][:] and again[1]["response"][:] == unseen["response"][:]
    toy = toy_dataset(num_groups=40)
    assert set(split_personas(toy, seed=0)[1]["group"][:]) != set(split_personas(toy, seed=1)[1]["group"][:])
    with pytest.raises(ValueError, match="pretrain_fraction"):
        split_personas(toy, pretrain_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2 groups"):
        split_personas(toy_dataset(num_groups=1))


def test_split_persona_examples(caplog):
    ds = toy_dataset(lines=(5, 40))
    sizes = dict(zip(*np.unique(ds["persona"][:], return_counts=True)))
    with caplog.at_level("WARNING"):
        train, test = split_persona_examples(ds, num_train=20, seed=0, max_test=10)
    assert "split 80/20" in caplog.text
    assert not set(train["response"][:]) & set(test["response"][:])
    train_sizes = dict(zip(*np.unique(train["persona"][:], return_counts=True)))
    test_sizes = dict(zip(*np.unique(test["persona"][:], return_counts=True)))
    for persona, n in sizes.items():
        if n > 20:
            assert train_sizes[persona] == 20 and test_sizes[persona] == min(10, n - 20)
        else:
            assert train_sizes[persona] == round(0.8 * n) and test_sizes[persona] == n - round(0.8 * n)
    again = split_persona_examples(ds, num_train=20, seed=0, max_test=10)
    assert again[0]["response"][:] == train["response"][:] and again[1]["response"][:] == test["response"][:]
    assert split_persona_examples(ds, num_train=20, seed=1)[0]["response"][:] != train["response"][:]
    with pytest.raises(ValueError, match="num_train"):
        split_persona_examples(ds, num_train=0)


def test_summarize():
    ds = Dataset.from_dict({c: [] for c in COLUMNS})
    assert summarize(ds)["examples"] == 0
    stats = summarize(toy_dataset(num_groups=2, personas_per_group=2, lines=(3, 4)))
    assert stats == {"examples": 12, "personas": 4, "groups": 2, "min_lines": 3, "median_lines": 3.0, "max_lines": 3}


# --- text personas ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # character-level: no merges
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    model = small_llama(len(vocab), max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return model, tokenizer


@pytest.mark.parametrize("chat_template", [None, "{% for m in messages %}U: {{ m['content'] }}\n{% endfor %}A:"])
def test_describe_personas_caches(tiny_lm, tmp_path, monkeypatch, chat_template):
    model, tokenizer = tiny_lm
    monkeypatch.setattr(tokenizer, "chat_template", chat_template)
    ds = toy_dataset(num_groups=1, personas_per_group=3, lines=(3, 9))
    cache = tmp_path / "sub" / "text_personas.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps({"g0/p1": "Known already."}))
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or generate(**kw))

    first = describe_personas(model, tokenizer, ds, cache, num_lines=2, max_new_tokens=5)
    assert len(calls) == 2 and first["g0/p1"] == "Known already."
    assert sorted(first) == ["g0/p0", "g0/p1", "g0/p2"] and all(isinstance(v, str) for v in first.values())
    assert json.loads(cache.read_text()) == first
    assert [p.name for p in cache.parent.iterdir()] == ["text_personas.json"]  # no temp file left behind
    assert model.training  # restored after generating in eval mode

    second = describe_personas(model, tokenizer, ds, cache, num_lines=2, max_new_tokens=5)
    assert len(calls) == 2 and second == first
    assert describe_personas(model, tokenizer, ds, cache, personas=["g0/p2"]) == {"g0/p2": first["g0/p2"]}
    with pytest.raises(ValueError, match="not in the dataset"):
        describe_personas(model, tokenizer, ds, cache, personas=["nobody"])
    cache.write_text("{not json")
    with pytest.raises(DataFormatError, match=r"text_personas\.json, line 1: .*delete the file"):
        describe_personas(model, tokenizer, ds, cache)
