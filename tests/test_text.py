"""The text side that reads sentences: the tokenizer, the two encoders, prompt ensembling, the
captions of templates and attributes, those a training step draws and encodes, and what
inference.py does with a user's words."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_inference import TINY

import inference
import settings
import train
from captions import (
    ANY,
    CLASS_WORDS,
    HELD_OUT_COMBINATIONS,
    HELD_OUT_TEMPLATES,
    TEMPLATES,
    CaptionedImages,
    attribute_captions,
    attribute_queries,
    image_properties,
    measure_strokes,
    stroke_edges,
    template_captions,
)
from checkpoint import load_model
from clip import CLIP, CLIPConfig
from dataset import Split
from embeddings import embed_captions, embed_texts
from text_encoder import DIGIT_CAPTIONS, PAD, UNKNOWN, CharTokenizer, LSTMTextEncoder, TextError, TransformerTextEncoder

TEXT_MODEL = [*TINY, "--text-encoder", "transformer", "--captions", "templates"]


def test_tokens_read_back_as_the_normalised_caption_with_unknown_characters_marked():
    tokenizer = CharTokenizer.from_captions(["a handwritten 7", "手写的数字七"], max_length=64)
    tokens = tokenizer(
        ["A  Handwritten ７", "手写的七", "a handwritten 9!"]
    )  # spaces, case and full width are normalised
    assert tokens.shape == (3, 16) and (tokens[1, 4:] == PAD).all()
    assert tokenizer.decode(tokens) == ["a handwritten 7", "手写的七", "a handwritten ??"]
    assert (tokens[2, -2:] == UNKNOWN).all()


def test_a_long_caption_is_cut_at_the_maximum_length():
    tokenizer = CharTokenizer.from_captions(["abc"], max_length=8)
    assert tokenizer(["abc" * 100_000]).shape == (1, 8)


@pytest.mark.parametrize("caption, reason", [("", "empty"), ("   \t ", "empty"), ("ЖЖЖ", "no character")])
def test_a_caption_that_cannot_be_read_is_refused_in_one_line(caption: str, reason: str):
    with pytest.raises(TextError, match=reason) as error:
        CharTokenizer.from_captions(["a handwritten 7"], max_length=64)([caption])
    assert "\n" not in str(error.value)


def test_a_splits_caption_in_characters_never_trained_on_is_scored_not_refused():
    # Chinese captions of Tux Paint's stamps: a validation caption may use no character the training ones did.
    config = CLIPConfig(
        image_widths=(8, 16), text_hidden_dim=16, embed_dim=16, text_encoder="transformer", text_characters="abcdog "
    )
    model = CLIP(config).eval()
    features, text_ids = embed_captions(model, ["a dog", "康乃馨", "a dog"])
    assert features.shape == (3, 16) and torch.isfinite(features).all() and text_ids.tolist() == [0, 1, 0]
    with pytest.raises(TextError, match="no character"):  # a user's query is still refused, saying why
        embed_texts(model, ["康乃馨"])


@pytest.mark.parametrize(
    "encoder",
    [
        TransformerTextEncoder(20, 16, width=16, layers=2, heads=2, embed_dim=8),
        LSTMTextEncoder(20, width=16, layers=2, embed_dim=8),
    ],
    ids=["transformer", "lstm"],
)
def test_padding_changes_nothing(encoder):
    tokens = torch.tensor([[5, 6, 7, PAD], [8, 9, PAD, PAD]])
    padded = F.pad(tokens, (0, 5), value=PAD)
    with torch.no_grad():
        assert torch.allclose(encoder(tokens), encoder(padded), atol=1e-5)
        assert not torch.allclose(
            encoder(tokens)[0], encoder(tokens[:, :2])[0], atol=1e-3
        )  # the characters themselves count


def test_captions_read_in_groups_of_similar_length_keep_their_order_and_embeddings():
    encoder = TransformerTextEncoder(20, 16, width=16, layers=2, heads=2, embed_dim=8)
    lengths = [7, 1, 12, 3, 3, 9, 2, 16, 5]
    tokens = torch.full((len(lengths), 16), PAD)
    for row, length in enumerate(lengths):
        tokens[row, :length] = torch.randint(PAD + 2, 20, (length,), generator=torch.Generator().manual_seed(row))
    with torch.no_grad():
        alone = torch.cat([encoder.read(row[None, :length]) for row, length in zip(tokens, lengths, strict=True)])
        assert torch.allclose(encoder(tokens), alone, atol=1e-5)


def test_text_is_read_in_fp32_on_a_cpu_even_under_autocast():
    # On a CPU, bf16 casts cost more than the text encoders' small products save (clip.CLIP.encode_text).
    config = CLIPConfig(
        image_widths=(8, 16), text_encoder="transformer", text_hidden_dim=16, text_characters="abc 01", embed_dim=8
    )
    model = CLIP(config)
    tokens = model.tokenize(["a 0", "bc 1"])
    with torch.no_grad():
        plain = model.encode_text(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model.encode_text(tokens), plain)


def test_a_class_is_the_mean_of_its_captions_embeddings():
    config = CLIPConfig(
        image_widths=(8, 16), text_encoder="transformer", text_hidden_dim=16, text_characters="abc 01", embed_dim=8
    )
    model = CLIP(config)
    classes = (("a 0", "b 0"), ("c 1",))
    with torch.no_grad():
        each = model.encode_text(model.tokenize(["a 0", "b 0", "c 1"]))
        assert torch.allclose(
            model.encode_classes(classes), F.normalize(torch.stack([each[:2].mean(0), each[2]]), dim=1), atol=1e-6
        )


def test_template_captions_name_every_digit_in_each_language_and_classify_with_the_trained_templates():
    captions = template_captions(TEMPLATES["mnist"], CLASS_WORDS["mnist"])
    assert (
        "a handwritten 7" in captions.texts and "a handwritten seven" in captions.texts and "手写的七" in captions.texts
    )
    assert "an 8" in captions.texts and "a 8" not in captions.texts
    seven = captions.class_captions()[7]
    assert "the number seven" in seven and all("seven" in c or "7" in c or "七" in c for c in seven)
    held_out = set(template_captions(HELD_OUT_TEMPLATES["mnist"], CLASS_WORDS["mnist"]).texts)
    assert not held_out & set(captions.texts)


def test_each_image_draws_one_of_the_captions_that_describe_it_each_as_often():
    captions = template_captions(TEMPLATES["mnist"], CLASS_WORDS["mnist"])
    properties = F.pad(torch.full((20_000, 1), 3), (0, 3), value=ANY)  # 20,000 images of a 3
    images = CaptionedImages(torch.zeros(20_000, 28, 28, dtype=torch.uint8), properties, captions)
    drawn, positives = images.draw(torch.arange(20_000), torch.Generator().manual_seed(0))
    describes = captions.describes(properties)
    assert describes[torch.arange(20_000), drawn].all() and torch.equal(positives, describes[:, drawn])
    counts = torch.bincount(drawn, minlength=len(captions.texts))[describes[0]]  # each caption of a 3
    expected = 20_000 / len(counts)
    assert len(counts) > 10 and ((counts - expected).abs() < 0.25 * expected).all()


@pytest.mark.parametrize("avoid_waiting", [False, True])  # on a CPU; on a GPU
@pytest.mark.parametrize("batch_size", [4, 32])  # fewer images than captions, and more
def test_a_step_encodes_captions_that_give_each_image_its_own_caption_s_embedding(batch_size: int, avoid_waiting: bool):
    model = CLIP(CLIPConfig(image_widths=(8, 16), text_hidden_dim=16, embed_dim=12))
    tokens = model.tokenize(DIGIT_CAPTIONS)
    drawn = torch.randint(10, (batch_size,), generator=torch.Generator().manual_seed(batch_size))
    texts, column = train.texts_to_encode(tokens, drawn, avoid_waiting)
    # Each drawn caption once; or, on a GPU with more images than captions, all ten, as finding them would wait
    assert len(texts) == (len(tokens) if avoid_waiting and batch_size >= len(tokens) else len(drawn.unique()))
    assert torch.allclose(model.encode_text(texts)[column], model.encode_text(tokens[drawn]), atol=1e-6)


def test_no_training_caption_states_a_held_out_combination():
    captions, properties = attribute_captions(), ("thickness", "width", "slant")
    for digit, attribute, b in HELD_OUT_COMBINATIONS:
        column = 1 + properties.index(attribute)
        assert not ((captions.says[:, 0] == digit) & (captions.says[:, column] == b)).any()
        assert (
            (captions.says[:, 0] != digit) & (captions.says[:, column] == b)
        ).any()  # the attribute, with other digits
        assert (
            (captions.says[:, 0] == digit) & (captions.says[:, column] != b) & (captions.says[:, column] != ANY)
        ).any()
    queries, held_out = attribute_queries()
    assert held_out.sum() == 4 * len(HELD_OUT_COMBINATIONS)  # two names of the digit in two languages
    assert "a thin 4" in [t for t, h in zip(queries.texts, held_out.tolist(), strict=True) if h]


def stroke(width: int, slant: float = 0.0, half_length: int = 8) -> torch.Tensor:
    """A (28, 28) vertical stroke `width` pixels wide, its top moved `slant` pixels right per pixel up."""
    image = torch.zeros(28, 28, dtype=torch.uint8)
    for row in range(14 - half_length, 14 + half_length):
        centre = 14 + round(slant * (14 - row))
        image[row, centre - width // 2 : centre - width // 2 + width] = 255
    return image


def test_the_attribute_rule_measures_what_its_words_say():
    thickness, width, slant = measure_strokes(
        torch.stack([stroke(2), stroke(5), stroke(3, slant=0.4), stroke(3, slant=-0.4)])
    ).T
    assert thickness[0] == 0 and thickness[1] > 0.3  # a two-pixel stroke does not survive a 3x3 erosion
    assert (
        slant[2] == pytest.approx(0.4, abs=0.05) and slant[3] == pytest.approx(-0.4, abs=0.05) and abs(slant[0]) < 1e-6
    )
    assert width[2] > width[0] and width[1] > width[0]  # a leaning or wider stroke spreads over more columns


def test_bins_cut_a_digit_s_training_images_into_thirds_and_place_new_images_by_them():
    images = torch.stack([stroke(w, s) for w in (1, 2, 3, 4, 5, 6) for s in (-0.4, -0.2, 0.0, 0.2, 0.4)])
    train = Split(images, torch.zeros(30, dtype=torch.long))
    edges = stroke_edges(train)
    for column in (1, 2, 3):  # thickness, width, slant: no bin empty or holding most
        assert all(
            6 <= count <= 14
            for count in torch.bincount(image_properties(train, edges)[:, column], minlength=3).tolist()
        )
    new = Split(torch.stack([stroke(1), stroke(6), stroke(3, -0.4), stroke(3, 0.4)]), torch.zeros(4, dtype=torch.long))
    thickness, _, slant = image_properties(new, edges)[:, 1:].T.tolist()
    assert thickness[:2] == [0, 2] and slant[2:] == [0, 2]


def test_a_model_trained_on_sentences_reads_a_user_s_words(runs_dir: Path, tmp_path: Path, capsys):
    result = train.main([*TEXT_MODEL, "--epochs", "1", "--runs-dir", str(runs_dir)])
    checkpoint = str(result["run_dir"] / "best.pt")
    out = inference.main(["--checkpoint", checkpoint, "--text", "the number seven", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert (
        'images nearest to the caption "the number seven"' in printed
        and (tmp_path / "text_retrieval_the-number-seven.png").is_file()
    )
    out = inference.main(
        [
            "--checkpoint",
            checkpoint,
            "--labels",
            "seven,three",
            "--template",
            "the number {}",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert out["queries"][0]["predicted_name"] in ("seven", "three") and len(out["queries"][0]["probabilities"]) == 2
    assert math.isclose(sum(out["queries"][0]["probabilities"]), 1, rel_tol=1e-5)
    inference.main(["--checkpoint", checkpoint, "--text", "7" * 100_000, "--output-dir", str(tmp_path)])
    assert "the caption has 100,000 characters; the model reads its first 64" in capsys.readouterr().out


@pytest.mark.parametrize(
    "labels, template, reason",
    [
        ("seven", "{}", "gives 1 class"),
        ("seven,Seven", "{}", "names a class twice"),
        ("seven,three", "no slot", 'must hold "{}" once'),
        ("sev\x07en,three", "{}", "control character"),
    ],
)
def test_bad_labels_get_one_line(labels: str, template: str, reason: str, runs_dir: Path):
    checkpoint = str(train.main([*TEXT_MODEL, "--dry-run", "--runs-dir", str(runs_dir)])["run_dir"] / "best.pt")
    with pytest.raises(TextError, match=reason) as error:
        inference.main(["--checkpoint", checkpoint, "--labels", labels, "--template", template])
    assert "\n" not in str(error.value)


def test_a_labels_file_that_is_not_utf8_is_named(runs_dir: Path, tmp_path: Path):
    checkpoint = str(train.main([*TEXT_MODEL, "--dry-run", "--runs-dir", str(runs_dir)])["run_dir"] / "best.pt")
    (tmp_path / "labels.txt").write_bytes("seven\nthree\n".encode("utf-16"))
    with pytest.raises(TextError, match="is not UTF-8"):
        inference.main(["--checkpoint", checkpoint, "--labels", str(tmp_path / "labels.txt")])


def test_a_digit_model_asked_for_a_sentence_says_what_to_retrain(digits_checkpoint: Path):
    with pytest.raises(TextError, match="knows only the captions 0-9.*--text-encoder transformer"):
        inference.main(["--checkpoint", str(digits_checkpoint), "--text", "a thick seven"])


def test_the_digit_encoder_cannot_be_trained_on_sentences(capsys):
    with pytest.raises(SystemExit):
        settings.parse_args(["--captions", "templates"])
    assert "--text-encoder digit reads only the captions 0-9" in capsys.readouterr().err


def test_attribute_captions_train_on_unrotated_unscaled_images_of_unchanged_strokes_unless_asked():
    # The captions state the slant, thickness and width of the image as it is.
    args = settings.parse_args(["--captions", "attributes", "--text-encoder", "transformer"])
    assert (args.max_rotation, args.max_scale, args.stroke, args.max_shift) == (0.0, 0.0, 0.0, 2.0)
    args = settings.parse_args(["--captions", "attributes", "--text-encoder", "transformer", "--max-rotation", "5"])
    assert args.max_rotation == 5.0
    assert settings.parse_args(["--captions", "templates", "--text-encoder", "transformer"]).max_rotation == 10.0


def test_a_checkpoint_from_before_the_text_encoders_still_loads_and_classifies(tmp_path: Path):
    old_config = {
        "image_widths": (8, 16),
        "image_blocks_per_stage": 1,
        "text_hidden_dim": 16,
        "embed_dim": 12,
    }  # all it held then
    model = CLIP(CLIPConfig.from_dict(old_config))
    state = {
        "model": model.state_dict(),
        "config": old_config,
        "args": {},
        "step": 0,
        "epoch": 0,
        "best_score": 0.0,
        "score_name": "accuracy",
        "history": [],
    }
    torch.save(state, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")[0]
    assert loaded.config.text_encoder == "digit" and loaded.config.class_captions == tuple((str(d),) for d in range(10))
    with torch.no_grad():
        assert torch.equal(loaded.encode_classes(), model.encode_classes())


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_held_out_templates_use_only_characters_of_the_trained_ones(dataset: str):
    trained = template_captions(TEMPLATES[dataset], CLASS_WORDS[dataset]).texts
    held_out = template_captions(HELD_OUT_TEMPLATES[dataset], CLASS_WORDS[dataset]).texts
    assert not set(held_out) & set(trained)  # new sentences...
    assert not set("".join(held_out)) - set("".join(trained))  # ...not new letters
