import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import train
from clip import CLIP, MAX_LOGIT_SCALE, CLIPConfig, clip_loss
from distributed import ONE_PROCESS
from text_encoder import DIGIT_CAPTIONS

SMALL = CLIPConfig(image_widths=(8, 16), image_blocks_per_stage=1, text_hidden_dim=16, embed_dim=12)


def same_digit(labels: torch.Tensor) -> torch.Tensor:
    """The positives of a batch whose captions state its images' digits: every pair of the same digit."""
    return labels[:, None] == labels[None, :]


def classic_clip_loss(logits: torch.Tensor) -> torch.Tensor:
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def test_embeddings_have_the_shared_size_and_unit_norm():
    model = CLIP(SMALL)
    images = torch.randn(5, 1, 28, 28)
    tokens = model.tokenize(DIGIT_CAPTIONS)
    image_features, text_features = model.encode_image(images), model.encode_text(tokens)
    assert image_features.shape == (5, 12) and text_features.shape == (10, 12)
    assert torch.allclose(image_features.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=1), torch.ones(10), atol=1e-5)
    assert model(images, tokens[:5]).shape == (5, 5)


def test_a_mirror_averaging_model_embeds_an_image_and_its_mirror_alike_outside_training_only():
    torch.manual_seed(0)
    model = CLIP(replace(SMALL, image_mirror_average=True)).eval()
    images = torch.randn(4, 1, 28, 28)
    mirrored = images.flip(-1)
    assert torch.allclose(model.encode_image(images), model.encode_image(mirrored), atol=1e-5)
    one_view = CLIP(SMALL).eval()
    one_view.load_state_dict(model.state_dict())
    assert not torch.allclose(one_view.encode_image(images), one_view.encode_image(mirrored), atol=1e-3)
    model.train()  # training sees each image as it was drawn, mirrored or not by the augmentation
    assert torch.allclose(model.encode_image(images), one_view.train().encode_image(images), atol=1e-6)


def test_loss_is_classic_clip_loss_when_labels_are_distinct():
    torch.manual_seed(0)
    logits = torch.randn(10, 10) * 3
    labels = torch.randperm(10)
    assert torch.allclose(clip_loss(logits, same_digit(labels)), classic_clip_loss(logits), atol=1e-6)


def test_loss_counts_same_digit_pairs_as_positives():
    labels = torch.tensor([3, 3, 7, 7, 1])
    # Every image scores high with every caption of its own digit: the ideal for this batch.
    logits = (10 * same_digit(labels).float()).requires_grad_()
    clip_loss(logits, same_digit(labels)).backward()
    assert logits.grad.abs().max() < 1e-3  # nothing left to learn
    classic = logits.detach().clone().requires_grad_()
    classic_clip_loss(classic).backward()
    assert classic.grad.abs().max() > 0.1  # the classic target pushes same-digit pairs apart


def test_loss_is_near_zero_when_matched_and_near_log_batch_when_random():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(16, 32), dim=1)
    labels = torch.arange(16)
    assert clip_loss(100 * features @ features.T, same_digit(labels)) < 0.05
    random_logits = F.normalize(torch.randn(16, 32), dim=1) @ features.T
    assert abs(clip_loss(random_logits, same_digit(labels)).item() - math.log(16)) < 0.3


def test_logit_scale_starts_at_clip_value_and_is_clamped_at_100():
    model = CLIP(SMALL)
    assert math.isclose(model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert math.isclose(model.logit_scale.exp().item(), 100.0, rel_tol=1e-5)
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)


def test_logits_stay_fp32_under_bf16_autocast():
    model = CLIP(SMALL)
    images, tokens = torch.randn(6, 1, 28, 28), model.tokenize(DIGIT_CAPTIONS[:6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images, tokens)
        image_features, text_features = model.encode_image(images), model.encode_text(tokens)
    assert logits.dtype == torch.float32
    expected = model.logit_scale.exp() * (image_features @ text_features.T)  # fp32, outside autocast
    assert torch.allclose(logits, expected, rtol=1e-6, atol=1e-6)


def test_loss_with_repeated_labels_matches_a_hand_computed_value():
    # Images 0 and 1 show the same digit, so each has two positive captions, each weighted 1/2.
    labels = torch.tensor([4, 4, 9])
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, -1.0, 2.0]])  # not symmetric

    def log_softmax(row: list[float]) -> list[float]:
        log_total = math.log(sum(math.exp(value) for value in row))
        return [value - log_total for value in row]

    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    rows, columns = logits.tolist(), logits.T.tolist()
    image_to_text = -sum(t * p for i in range(3) for t, p in zip(targets[i], log_softmax(rows[i]), strict=True)) / 3
    text_to_image = -sum(t * p for i in range(3) for t, p in zip(targets[i], log_softmax(columns[i]), strict=True)) / 3
    assert clip_loss(logits, same_digit(labels)).item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-6)
    assert clip_loss(logits.T, same_digit(labels)).item() == pytest.approx(
        (image_to_text + text_to_image) / 2, rel=1e-6
    )  # symmetric in its two directions


def test_config_survives_the_json_round_trip_of_a_checkpoint():
    # train.py saves config.to_dict() in the checkpoint and inference rebuilds the model with from_dict;
    # JSON and torch.load hand image_widths back as a list, which must become the tuple again.
    stored = json.loads(json.dumps(SMALL.to_dict()))
    assert stored["image_widths"] == [8, 16]
    assert CLIPConfig.from_dict(stored) == SMALL
    # A field the checkpoint lacks takes its default, image_widths included.
    assert CLIPConfig.from_dict({"embed_dim": 32}) == CLIPConfig(embed_dim=32)
    with pytest.raises(ValueError, match=r"unknown model config fields \['colour', 'depth'\]"):
        CLIPConfig.from_dict({"embed_dim": 32, "depth": 3, "colour": True})


def test_unnormalised_embeddings_are_the_features_before_their_projection_onto_the_sphere():
    model = CLIP(SMALL)
    images, tokens = torch.randn(4, 1, 28, 28), model.tokenize(DIGIT_CAPTIONS)
    raw_images, raw_texts = model.encode_image(images, normalize=False), model.encode_text(tokens, normalize=False)
    # The raw features are not unit vectors (so the flag matters), and normalising them gives the embeddings.
    assert not torch.allclose(raw_images.norm(dim=1), torch.ones(4), atol=1e-3)
    assert not torch.allclose(raw_texts.norm(dim=1), torch.ones(10), atol=1e-3)
    assert torch.allclose(F.normalize(raw_images, dim=1), model.encode_image(images), atol=1e-6)
    assert torch.allclose(F.normalize(raw_texts, dim=1), model.encode_text(tokens), atol=1e-6)


def test_class_embeddings_are_made_on_the_model_s_device():
    # The meta device stands in for a GPU on machines without one: tokens left on the CPU would fail there.
    assert CLIP(SMALL).to("meta").encode_classes().device.type == "meta"


def test_loss_spreads_each_direction_over_what_describes_what():
    # Caption 0 says "a 7", caption 1 "a thick 7": image 0 (a thin 7) fits only caption 0; image 1
    # (a thick 7) fits both. Image 0's target is caption 0; image 1's is half each. Caption 0's target
    # is half each image; caption 1's is image 1.
    positives = torch.tensor([[True, False], [True, True]])
    logits = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    log_p_rows, log_p_columns = logits.log_softmax(dim=1), logits.log_softmax(dim=0)
    image_to_text = -(log_p_rows[0, 0] + (log_p_rows[1, 0] + log_p_rows[1, 1]) / 2) / 2
    text_to_image = -((log_p_columns[0, 0] + log_p_columns[1, 0]) / 2 + log_p_columns[1, 1]) / 2
    assert clip_loss(logits, positives).item() == pytest.approx(((image_to_text + text_to_image) / 2).item(), rel=1e-6)


def test_a_caption_drawn_by_several_images_is_scored_once_with_the_loss_of_the_whole_batch():
    # Twelve images of four digits drew captions 0, 1 and 3 of five encoded; caption 2 and caption 4 were drawn by
    # none (a GPU encodes every caption). Scoring each caption once, weighted by how many drew it, must give the
    # loss, gradients and batch accuracy of the (12, 12) logits of every image against every image's caption.
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 3, 3, 0, 1, 1, 3, 0, 3, 1, 0])
    column = labels.clone()  # caption t states digit t
    positives = same_digit(labels)
    images = torch.randn(12, 6, generator=generator, requires_grad=True)
    texts = torch.randn(5, 6, generator=generator, requires_grad=True)
    scale = torch.tensor(7.0)

    loss, hits = train.batch_loss(images, texts, scale, column, positives, ONE_PROCESS)
    gradients = torch.autograd.grad(loss, (images, texts))
    whole_batch = scale * images @ texts[column].T  # (12, 12)
    expected = clip_loss(whole_batch, positives)
    expected_gradients = torch.autograd.grad(expected, (images, texts))

    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(gradients, expected_gradients, strict=True))
    assert torch.equal(hits[:, 0], positives.gather(1, whole_batch.argmax(dim=1, keepdim=True))[:, 0])
    assert 0 < hits.sum() < 12  # some images score another digit's caption highest: the check above can fail
