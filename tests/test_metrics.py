import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from metrics import (
    RECALL_AT,
    centred,
    evaluate_embeddings,
    hubness,
    image_caption_retrieval,
    image_retrieval,
    image_to_text,
    modality_gap,
    rank_of_label,
    rsum_line,
    similarity_gap,
    text_to_image,
    zero_shot_classification,
)


def on_circle(degrees: list[float]) -> torch.Tensor:
    """Unit vectors in the plane at the given angles: the cosine of two is the cosine of their angle."""
    radians = torch.tensor(degrees) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_image_retrieval_ranks_by_cosine_as_in_a_hand_computed_case(chunk_size: int):
    # Angles 0, 20, 30, 90 with digits 0, 0, 1, 1. Ranked by cosine (relevant = 1):
    # 0 deg: 20 30 90 -> 1 0 0, AP 1;   20 deg: 30 0 90 -> 0 1 0, AP 1/2
    # 30 deg: 20 0 90 -> 0 0 1, AP 1/3; 90 deg: 30 20 0 -> 1 0 0, AP 1
    features, labels = on_circle([0, 20, 30, 90]), torch.tensor([0, 0, 1, 1])
    result = image_retrieval(features, labels, ks=(1, 2, 3), hubness_k=1, chunk_size=chunk_size)
    assert result["precision@1"] == pytest.approx(2 / 4)
    assert result["precision@2"] == pytest.approx((1 / 2 + 1 / 2 + 0 + 1 / 2) / 4)
    assert result["precision@3"] == pytest.approx(1 / 3)
    assert result["mAP"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4)
    # Nearest neighbours: 0 -> 20, 20 -> 30, 30 -> 20, 90 -> 30: 20 and 30 are found twice, 0 and 90 never.
    assert result["hubness"] == pytest.approx({"k": 1, "coverage": 0.5, "skewness": 0.0, "max_occurrence": 2})


@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_hubness_finds_the_image_that_is_every_query_s_nearest(chunk_size: int):
    # A hub at the north pole and four images around it, 30-33 degrees from it and 41 or more
    # from each other: the hub is the nearest image of all four, the nearest 30 degrees away of the hub.
    # k-occurrences (k = 1): hub 4, the image at 30 degrees 1, the rest 0.
    latitudes, longitudes = torch.tensor([30.0, 31, 32, 33]).deg2rad(), torch.tensor([0.0, 90, 180, 270]).deg2rad()
    ring = torch.stack([latitudes.sin() * longitudes.cos(), latitudes.sin() * longitudes.sin(), latitudes.cos()], dim=1)
    features = torch.cat([torch.tensor([[0.0, 0.0, 1.0]]), ring])
    result = image_retrieval(features, torch.zeros(5, dtype=torch.long), ks=(1,), hubness_k=1, chunk_size=chunk_size)
    # Mean 1, deviations 3, 0, -1, -1, -1: variance 12/5, third moment 24/5.
    assert result["hubness"] == pytest.approx(
        {"k": 1, "coverage": 2 / 5, "skewness": (24 / 5) / (12 / 5) ** 1.5, "max_occurrence": 4}
    )


def test_a_query_is_never_its_own_neighbour():
    # Images 0 and 1 are the same picture; every image has its own label, so a query that found itself would score.
    features, labels = on_circle([0, 0, 90]), torch.tensor([0, 1, 2])
    assert image_retrieval(features, labels, ks=(1,), hubness_k=1)["precision@1"] == 0.0


def test_perfect_embedding_has_precision_and_map_one():
    labels = torch.arange(33) % 3  # 11 images per digit: 10 relevant neighbours each
    features = F.one_hot(labels, 8).float()  # every digit its own direction
    result = image_retrieval(features, labels, chunk_size=7)
    assert {name: result[name] for name in ("precision@1", "precision@5", "precision@10", "mAP")} == pytest.approx(
        dict.fromkeys(result.keys() - {"hubness"}, 1.0)
    )


def test_random_embedding_scores_chance():
    n, per_digit = 2000, 200
    labels = torch.arange(n) % 10
    features = F.normalize(torch.randn(n, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    result = image_retrieval(features, labels, chunk_size=256)
    # A random ranking of M = n - 1 neighbours of which R = per_digit - 1 are relevant:
    # precision@k is R/M on average, and averaging precision over the relevant ranks gives
    # E[AP] = (H_M + (M - H_M)(R - 1)/(M - 1)) / M, H_M the M-th harmonic number.
    m, r = n - 1, per_digit - 1
    harmonic = sum(1 / k for k in range(1, m + 1))
    for k in (1, 5, 10):
        assert result[f"precision@{k}"] == pytest.approx(r / m, abs=0.02)
    assert result["mAP"] == pytest.approx((harmonic + (m - harmonic) * (r - 1) / (m - 1)) / m, abs=0.005)


def test_image_retrieval_refuses_k_beyond_the_gallery():
    with pytest.raises(ValueError, match="0 < k < 4"):
        image_retrieval(on_circle([0, 20, 30, 90]), torch.tensor([0, 0, 1, 1]), ks=(1, 4))
    with pytest.raises(ValueError, match="0 < k < 4"):
        image_retrieval(on_circle([0, 20, 30, 90]), torch.tensor([0, 0, 1, 1]), ks=(1,), hubness_k=4)


def test_zero_shot_and_image_to_text_match_a_hand_computed_case():
    texts = torch.eye(3)  # the captions of digits 0, 1, 2
    images = F.normalize(torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0], [0.2, 0.5, 1.0], [1.0, 0.6, 0.3]]), dim=1)
    labels = torch.tensor([0, 1, 2, 2])  # the true caption ranks 1, 2, 1 and 3
    zero_shot = zero_shot_classification(images, texts, labels)
    assert zero_shot["top1_accuracy"] == pytest.approx(2 / 4)
    assert zero_shot["top2_accuracy"] == pytest.approx(3 / 4)
    assert zero_shot["per_digit_accuracy"] == pytest.approx([1.0, 0.0, 0.5])
    assert zero_shot["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [1, 0, 1]]
    assert image_to_text(images, texts, labels) == pytest.approx({"recall@1": 2 / 4, "mean_rank": (1 + 2 + 1 + 3) / 4})


def test_text_to_image_matches_a_hand_computed_case():
    texts = on_circle([0, 90])  # captions of digits 0 and 1
    images, labels = on_circle([10, 40, 50, 80]), torch.tensor([0, 1, 0, 0])
    # Caption 0 ranks the images 10 40 50 80 (relevant 1 0 1 1); caption 1 ranks 80 50 40 10 (0 0 1 0).
    result = text_to_image(images, texts, labels, ks=(1, 2, 4, 1000))  # k = 1000 exceeds the 4 images: left out
    assert result["per_digit"]["precision@1"] == [1.0, 0.0]
    assert result["per_digit"]["precision@4"] == [0.75, 0.25]
    assert result["per_digit"]["recall@2"] == pytest.approx([1 / 3, 0.0])
    assert result["per_digit"]["first_correct_rank"] == [1.0, 3.0]
    assert result["precision@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert result["recall@4"] == pytest.approx(1.0)
    assert result["mean_first_correct_rank"] == pytest.approx(2.0)
    # The averages are exactly what metrics.json reports; first_correct_rank is averaged only as
    # mean_first_correct_rank.
    assert set(result) == {f"{name}@{k}" for name in ("precision", "recall") for k in (1, 2, 4)} | {
        "mean_first_correct_rank",
        "per_digit",
    }


def test_similarity_gap_of_a_hand_computed_case():
    texts = torch.eye(2)
    images, labels = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1), torch.tensor([0, 1])
    # Matching cosines 1 and 0.707; non-matching 0 and 0.707.
    result = similarity_gap(images, texts, labels)
    assert result == pytest.approx({"matching": (1 + 0.5**0.5) / 2, "non_matching": 0.5**0.5 / 2, "gap": 0.5})


def test_a_tie_counts_as_argmax_breaks_it_by_column_order():
    texts = torch.eye(2)
    images = F.normalize(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), dim=1)  # equally near both captions
    labels = torch.tensor([0, 1])  # argmax says 0 for both: right for the first, wrong for the second
    assert image_to_text(images, texts, labels) == pytest.approx({"recall@1": 0.5, "mean_rank": 1.5})
    assert zero_shot_classification(images, texts, labels)["top1_accuracy"] == 0.5


def test_tied_images_are_ranked_in_the_order_of_the_split():
    # Images 1 and 2 are the same picture: from image 0, image 1 (another digit) comes first, image 2 second.
    features, labels = on_circle([0, 30, 30, 90]), torch.tensor([0, 1, 0, 1])
    assert image_retrieval(features, labels, ks=(1, 2), hubness_k=1)["precision@1"] == pytest.approx(
        (0 + 0 + 0 + 1) / 4
    )
    texts = on_circle([30, 90])
    assert text_to_image(features, texts, labels, ks=(1,), centre=False)["per_digit"]["precision@1"] == [0.0, 1.0]


def test_a_digit_absent_from_the_split_has_no_scores_and_is_left_out_of_the_means():
    texts = torch.eye(3)  # captions of digits 0, 1, 2; no image of digit 2
    images, labels = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.1, 1.0, 0.2]]), dim=1), torch.tensor([0, 1])
    assert zero_shot_classification(images, texts, labels)["per_digit_accuracy"] == [1.0, 1.0, None]
    result = text_to_image(images, texts, labels, ks=(1,), centre=False)
    assert result["per_digit"]["first_correct_rank"] == [1.0, 1.0, None]
    assert result["per_digit"]["recall@1"] == [1.0, 1.0, None]
    assert (result["precision@1"], result["mean_first_correct_rank"]) == (1.0, 1.0)
    gap = modality_gap(images, texts, labels, k=1)
    assert gap["caption_to_centroid"][2] is None and gap["returned_percentile"][2] is None


def test_centring_returns_a_digit_s_typical_images_where_the_plain_cosine_returns_its_extremes():
    # The images lie around the z axis, digit 0 towards +x and digit 1 towards -x, each spread
    # along y; the captions lie around the y axis (their own cone), towards +x and -x. The plain
    # cosine favours the images furthest along y, the extremes; centring both removes the
    # images' shared z and the captions' shared y, and leaves each caption pointing at the middle
    # of its digit.
    spread = torch.tensor([-0.2, -0.1, 0.0, 0.1, 0.2])
    side = torch.tensor([1.0] * 5 + [-1.0] * 5)
    images = F.normalize(torch.stack([0.3 * side, spread.repeat(2), torch.ones(10)], dim=1), dim=1)
    captions = F.normalize(torch.tensor([[0.3, 1.0, 0.0], [-0.3, 1.0, 0.0]]), dim=1)
    gap = modality_gap(images, captions, (side < 0).long(), k=1)
    assert gap["returned_percentile_by_cosine"] == pytest.approx(
        [60.0, 60.0]
    )  # y = 0.2: three of five lie nearer the middle
    assert gap["returned_percentile"] == pytest.approx([0.0, 0.0])  # y = 0, the middle itself


def test_map_leaves_out_a_query_whose_digit_has_no_other_image():
    # Digit 1 has a single image: it has nothing to find, so its AP is undefined, not 0. The other two
    # queries each find their one relevant image first: AP 1 each, so mAP is 1, not 2/3.
    features, labels = on_circle([0, 20, 90]), torch.tensor([0, 0, 1])
    assert image_retrieval(features, labels, ks=(1,), hubness_k=1)["mAP"] == pytest.approx(1.0)


def test_a_long_run_of_tied_images_is_ranked_in_the_order_of_the_split():
    # Twenty copies of one picture, the first of digit 0 and the rest of digit 1. Ranked in split order,
    # every query's first neighbour is image 0 (image 1 for image 0 itself), always of the other digit.
    # An unstable sort, which shuffles runs this long, would put images of the same digit first.
    features, labels = on_circle([0] * 20), torch.tensor([0] + [1] * 19)
    result = image_retrieval(features, labels, ks=(1,), hubness_k=1)
    assert result["precision@1"] == 0.0
    assert result["hubness"]["max_occurrence"] == 19
    by_cosine = text_to_image(features, on_circle([0, 90]), labels, ks=(1,), centre=False)
    assert by_cosine["per_digit"]["first_correct_rank"] == [1.0, 2.0]


def test_hubness_of_an_even_gallery_is_zero_skewness_not_nan():
    # Every image found equally often: no spread, so no hubs; the skewness formula would divide 0 by 0.
    assert hubness(torch.ones(6, dtype=torch.long), k=1) == {
        "k": 1,
        "coverage": 1.0,
        "skewness": 0.0,
        "max_occurrence": 1,
    }


def test_hubness_skewness_of_a_narrow_hand_computed_distribution():
    # k-occurrences 3, 0, 0 and seven 1s: mean 1, deviations 2, -1, -1 and seven 0s: variance 6/10 (spread
    # below 1), third moment 6/10, skewness 0.6 / 0.6 ** 1.5.
    result = hubness(torch.tensor([3, 0, 0, 1, 1, 1, 1, 1, 1, 1]), k=1)
    assert result == pytest.approx({"k": 1, "coverage": 0.8, "skewness": 0.6 / 0.6**1.5, "max_occurrence": 3})


def test_centred_features_are_unit_vectors_from_the_mean():
    # Mean (2/3, 2/3): the centred points are (1, -2)/3, (-2, 1)/3 and (1, 1)/3, each then scaled to length 1.
    expected = torch.tensor([[1 / 5**0.5, -2 / 5**0.5], [-2 / 5**0.5, 1 / 5**0.5], [1 / 2**0.5, 1 / 2**0.5]])
    assert torch.allclose(centred(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])), expected, atol=1e-6)


def test_modality_gap_matches_a_hand_computed_case():
    # Digit 0: (1, 0, 0) and (0.6, +-0.8, 0), centroid direction x, distances 0, 0.4, 0.4 (median 0.4).
    # Digit 1: (0, +-0.6, 0.8), centroid direction z, distances 0.2, 0.2 (median 0.2).
    images = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.6, -0.8, 0.0], [0.0, 0.6, 0.8], [0.0, -0.6, 0.8]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    captions = torch.tensor([[0.8, 0.6, 0.0], [0.0, 0.8, 0.6]])  # cosines 0.8 and 0.6 with their centroids
    result = modality_gap(images, captions, labels, k=2)
    assert result["caption_to_centroid"] == pytest.approx([0.2, 0.4])
    assert result["image_to_centroid"] == pytest.approx([0.4, 0.2])
    # By cosine, caption 0 returns images 1 (one of its digit's three nearer the centroid: 1/3) and 0 (none: 0);
    # caption 1 returns image 3 (0 of 2) and image 1, of digit 0 (1/3): both average 100 * (1/3) / 2.
    assert result["returned_percentile_by_cosine"] == pytest.approx([50 / 3, 50 / 3])
    assert result["mean_returned_percentile_by_cosine"] == pytest.approx(50 / 3)
    # Centred, caption 0 points to -y and returns images 0 (0) and 2 (1/3); caption 1 returns digit 1's two (0 each).
    assert result["returned_percentile"] == pytest.approx([50 / 3, 0.0])
    assert result["mean_returned_percentile"] == pytest.approx(25 / 3)
    assert set(result) == {
        "caption_to_centroid",
        "image_to_centroid",
        "returned_percentile",
        "mean_returned_percentile",
        "returned_percentile_by_cosine",
        "mean_returned_percentile_by_cosine",
    }


def test_evaluate_embeddings_groups_each_measurement_under_its_metrics_json_name():
    # The measurements themselves are checked by hand above; this checks that metrics.json gets each under its
    # name, on the given embeddings, with text-to-image ranked both by centred embeddings and by the plain cosine.
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(4)
    # Images and captions in cones of their own (offsets along opposite ways of a fourth axis), as a CLIP model makes
    # them.
    images = F.normalize(
        F.one_hot(labels, 4) + 0.5 * torch.randn(12, 4, generator=generator) + torch.tensor([0, 0, 0, 2.0]), dim=1
    )
    captions = F.normalize(
        torch.eye(3, 4) - torch.tensor([0, 0, 0, 1.0]) + 0.3 * torch.randn(3, 4, generator=generator), dim=1
    )
    result = evaluate_embeddings(images, captions, labels)
    assert result == {
        "zero_shot": zero_shot_classification(images, captions, labels),
        "image_to_image": image_retrieval(images, labels, ks=(1, 5, 10), hubness_k=5),
        "text_to_image": text_to_image(images, captions, labels, centre=True),
        "text_to_image_by_cosine": text_to_image(images, captions, labels, centre=False),
        "image_to_text": image_to_text(images, captions, labels),
        "similarity": similarity_gap(images, captions, labels),
        "modality_gap": modality_gap(images, captions, labels, k=5),
    }
    # On this set the two rankings disagree, so the comparison above tells them apart.
    assert result["text_to_image"] != result["text_to_image_by_cosine"]


def test_rank_of_label_stays_on_the_device_of_its_inputs():
    # Evaluation runs on the GPU; the meta device stands in for one here: a helper tensor made on the CPU would fail.
    similarities, labels = torch.zeros(4, 3, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    ranks = rank_of_label(similarities, labels)
    assert ranks.device.type == "meta" and ranks.shape == (4,)


# An image-caption collection whose cosines are set by hand: the images are the first three axes, so a
# caption's cosine with image i is its i-th coordinate (the fourth only makes it unit length). Captions
# 0 and 1 belong to image 0, caption 2 to image 1, captions 3 and 4 to image 2; caption 3 repeats caption
# 0's string (text id 7), so image 0 and image 2 each have captions 0 and 3 as relevant.
#             caption  0    1    2    3    4
# image 0 (texts 7, 3)  .6   0    0   .8   0
# image 1 (text 11)     .8  .6   .6    0   0
# image 2 (texts 7, 5)   0   0   .8    0  .6
HAND_IMAGES = torch.eye(3, 4)
HAND_CAPTIONS = torch.tensor(
    [[0.6, 0.8, 0.0, 0.0], [0.0, 0.6, 0.0, 0.8], [0.0, 0.6, 0.8, 0.0], [0.8, 0.0, 0.0, 0.6], [0.0, 0.0, 0.6, 0.8]]
)
HAND_CAPTION_IMAGE = torch.tensor([0, 0, 1, 2, 2])
HAND_CAPTION_TEXT = torch.tensor([7, 3, 11, 7, 5])


def test_image_caption_retrieval_matches_a_hand_computed_case():
    result = image_caption_retrieval(HAND_IMAGES, HAND_CAPTIONS, HAND_CAPTION_IMAGE, HAND_CAPTION_TEXT)
    # Image to text ranks the four distinct texts, each by its best copy (text 7: the better of captions 0 and 3).
    # Image 0: its best relevant text is 7 (caption 3, image 2's, the same string as its own caption 0), at .8,
    # above everything: rank 1. Image 1: text 11 at .6, below text 7 (.8) and tied with text 3 (.6),
    # and a tie counts against it: rank 3. Image 2: text 5 at .6, below text 11 (.8): rank 2.
    assert result["image_to_text"] == pytest.approx(
        {"recall@1": 1 / 3, "recall@5": 1.0, "recall@10": 1.0, "median_rank": 2.0, "mean_rank": 2.0}
    )
    # Text to image. Caption 0 (relevant: images 0 and 2): image 0 at .6, below image 1 (.8): rank 2. Caption 1: image 0
    # at 0, below image 1 (.6) and tied with image 2 (0): rank 3. Caption 2: image 1 at .6, below image 2: rank 2.
    # Caption 3: image 0 (not its own image, but one of its string's) at .8: rank 1. Caption 4: image 2 at .6: rank 1.
    assert result["text_to_image"] == pytest.approx(
        {"recall@1": 2 / 5, "recall@5": 1.0, "recall@10": 1.0, "median_rank": 2.0, "mean_rank": (2 + 3 + 2 + 1 + 1) / 5}
    )
    assert result["rsum"] == pytest.approx(100 * (1 / 3 + 1 + 1 + 2 / 5 + 1 + 1))
    # Relevant pairs: .6 0 .8 | .6 | 0 0 .6 (seven, sum 2.6); the other eight sum to 2.2.
    assert result["similarity"] == pytest.approx(
        {"matching": 2.6 / 7, "non_matching": 2.2 / 8, "gap": 2.6 / 7 - 2.2 / 8}
    )
    assert (result["images"], result["captions"]) == (3, 5)


def test_with_distinct_strings_only_an_image_s_own_captions_are_relevant():
    # The same collection with every string its own: image 0's best own caption (0, at .6) falls behind caption 3 (.8),
    # rank 2; caption 3's own image (2, at 0) falls behind image 0 (.8) and ties with image 1 (0), rank 3.
    result = image_caption_retrieval(HAND_IMAGES, HAND_CAPTIONS, HAND_CAPTION_IMAGE, torch.arange(5))
    assert result["image_to_text"]["mean_rank"] == pytest.approx((2 + 3 + 2) / 3)
    assert result["text_to_image"]["mean_rank"] == pytest.approx((2 + 3 + 2 + 3 + 1) / 5)
    assert result["text_to_image"]["recall@1"] == pytest.approx(1 / 5)


def random_collection(n_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with 1 to 5 captions each, every caption near its image, and one string in six repeated from a caption of
    another image: (image_features, caption_features, caption_image, caption_text)."""
    generator = torch.Generator().manual_seed(seed)
    caption_image = torch.arange(n_images).repeat_interleave(torch.randint(1, 6, (n_images,), generator=generator))
    caption_text = torch.arange(len(caption_image))
    repeated = torch.rand(len(caption_image), generator=generator) < 1 / 6
    caption_text[repeated] = torch.randint(0, len(caption_image), (int(repeated.sum()),), generator=generator)
    images = F.normalize(torch.randn(n_images, 16, generator=generator), dim=1)
    captions = F.normalize(
        images[caption_image] + 1.5 * torch.randn(len(caption_image), 16, generator=generator), dim=1
    )
    return images, captions, caption_image, caption_text


def ranks_by_definition(similarities: torch.Tensor, relevant: torch.Tensor) -> list[int]:
    """Each row's rank, one query at a time: 1 + the non-relevant items scoring at least as its best relevant one."""
    ranks = []
    for scores, row in zip(similarities.tolist(), relevant.tolist(), strict=True):
        best = max(score for score, is_relevant in zip(scores, row, strict=True) if is_relevant)
        ranks.append(1 + sum(score >= best and not is_relevant for score, is_relevant in zip(scores, row, strict=True)))
    return ranks


def test_image_caption_retrieval_ranks_and_scores_as_the_definitions_do():
    images, captions, caption_image, caption_text = random_collection(40, seed=1)
    result = image_caption_retrieval(images, captions, caption_image, caption_text, chunk_size=7)
    # Relevance by the definition, one (image, caption) pair at a time.
    texts_of = [set(caption_text[caption_image == i].tolist()) for i in range(len(images))]
    relevant = torch.tensor([[text in texts for text in caption_text.tolist()] for texts in texts_of])  # (N, K)
    assert relevant.sum() > len(caption_text)  # some strings repeat across images, so the two definitions differ here
    similarities = images @ captions.T
    # Image to text ranks each distinct text once, by its best copy.
    texts = caption_text.unique().tolist()
    text_scores = torch.stack([similarities[:, caption_text == text].amax(dim=1) for text in texts], dim=1)
    text_relevant = torch.tensor([[text in texts_of_image for text in texts] for texts_of_image in texts_of])
    for direction, ranks in (
        ("image_to_text", ranks_by_definition(text_scores, text_relevant)),
        ("text_to_image", ranks_by_definition(similarities.T, relevant.T)),
    ):
        recalls = {f"recall@{k}": sum(rank <= k for rank in ranks) / len(ranks) for k in RECALL_AT}
        assert result[direction] == pytest.approx(
            recalls | {"median_rank": statistics.median(ranks), "mean_rank": statistics.mean(ranks)}
        )
    matching, non_matching = similarities[relevant].mean().item(), similarities[~relevant].mean().item()
    # The mean of the non-matching cosines is near 0: float error is absolute there, not relative.
    assert result["similarity"] == pytest.approx(
        {"matching": matching, "non_matching": non_matching, "gap": matching - non_matching}, abs=1e-6
    )


def test_copies_of_a_wrong_caption_count_once_ahead_of_the_right_one():
    # Image 0's own caption (text 1) scores .6; a wrong one (text 0), which five other images share, .8. Ranking the
    # copies would put image 0 sixth; ranking texts puts it second.
    caption_image = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    caption_text = torch.tensor([1, 2, 0, 0, 0, 0, 0])
    images = F.normalize(torch.tensor([[0.6, 0.8, 0.0]]), dim=1).expand(6, 3)
    captions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], *[[0.0, 1.0, 0.0]] * 5])
    result = image_caption_retrieval(images, captions, caption_image, caption_text)
    assert result["image_to_text"]["recall@5"] == 1.0  # image 0 second; images 1 to 5 first
    assert result["image_to_text"]["mean_rank"] == pytest.approx((2 + 5 * 1) / 6)


def test_chunked_image_caption_retrieval_equals_one_chunk():
    collection = random_collection(50, seed=2)
    whole = image_caption_retrieval(*collection, chunk_size=10_000)
    for chunk_size in (1, 3, 16):
        chunked = image_caption_retrieval(*collection, chunk_size=chunk_size)
        assert chunked | {"similarity": None} == whole | {
            "similarity": None
        }  # ranks exactly; cosine sums up to float error
        assert chunked["similarity"] == pytest.approx(whole["similarity"], abs=1e-6)


def test_recall_rises_with_k_and_rsum_is_the_sum_of_the_six():
    result = image_caption_retrieval(*random_collection(200, seed=3))
    for direction in ("image_to_text", "text_to_image"):
        recalls = [result[direction][f"recall@{k}"] for k in RECALL_AT]
        assert 0 < recalls[0] < recalls[1] < recalls[2] < 1
    six = [result[direction][f"recall@{k}"] for direction in ("image_to_text", "text_to_image") for k in RECALL_AT]
    assert result["rsum"] == pytest.approx(100 * sum(six))


def test_a_perfect_embedding_ranks_every_query_first():
    caption_image = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    images = torch.eye(4)  # each image its own direction, and each caption its image's
    result = image_caption_retrieval(images, images[caption_image], caption_image, torch.arange(7))
    perfect = {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "median_rank": 1.0, "mean_rank": 1.0}
    assert result["image_to_text"] == perfect and result["text_to_image"] == perfect
    assert result["rsum"] == 600.0
    assert result["similarity"] == {"matching": 1.0, "non_matching": 0.0, "gap": 1.0}


def test_a_collapsed_embedding_gets_the_worst_ranks_not_the_best():
    # Every embedding the same: every score ties, and each query ranks behind every non-relevant item.
    caption_image = torch.tensor([0, 1, 1, 2, 2, 2, 3])  # 1, 2, 3 and 1 captions
    same = torch.tensor([1.0, 0.0, 0.0])
    result = image_caption_retrieval(same.expand(4, 3), same.expand(7, 3), caption_image, torch.arange(7))
    # Image i ranks behind the 7 - c_i captions of the others: ranks 7, 6, 5, 7. Each caption ranks behind 3 images:
    # rank 4.
    assert result["image_to_text"] == pytest.approx(
        {"recall@1": 0.0, "recall@5": 0.25, "recall@10": 1.0, "median_rank": 6.5, "mean_rank": 25 / 4}
    )
    assert result["text_to_image"] == pytest.approx(
        {"recall@1": 0.0, "recall@5": 1.0, "recall@10": 1.0, "median_rank": 4.0, "mean_rank": 4.0}
    )
    assert result["similarity"]["gap"] == 0.0


def test_image_caption_retrieval_refuses_an_image_without_a_caption():
    # Image 1 has none: its image-to-text rank would be undefined, and a made-up one would skew the recalls.
    with pytest.raises(ValueError, match="1 of the 3 images have no caption"):
        image_caption_retrieval(torch.eye(3), torch.eye(3), torch.tensor([0, 2, 2]), torch.arange(3))
    with pytest.raises(ValueError, match="images 0 to 2"):
        image_caption_retrieval(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]), torch.arange(3))
    with pytest.raises(
        ValueError, match="1 of the 3 images have no caption"
    ):  # the last one, past every caption's image
        image_caption_retrieval(torch.eye(3), torch.eye(3), torch.tensor([0, 0, 1]), torch.arange(3))


def test_where_every_pair_is_relevant_the_non_matching_mean_is_nan_not_an_error():
    # One caption text that both images have: there is no non-matching pair to average.
    result = image_caption_retrieval(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), torch.tensor([4, 4]))
    assert result["similarity"]["matching"] == pytest.approx(0.5) and math.isnan(result["similarity"]["non_matching"])


def test_rsum_line_prints_percentages_and_median_ranks():
    result = image_caption_retrieval(HAND_IMAGES, HAND_CAPTIONS, HAND_CAPTION_IMAGE, HAND_CAPTION_TEXT)
    assert rsum_line(result) == (
        "RSum 473.3; image→text R@1/5/10 33.3/100.0/100.0% (median rank 2); "
        "text→image R@1/5/10 40.0/100.0/100.0% (median rank 2)"
    )
