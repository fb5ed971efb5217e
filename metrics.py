"""Measurements of a CLIP embedding space, as CLIP papers report them.

Every function takes unit-norm embeddings (so a dot product is a cosine) and
integer labels as torch tensors, and returns plain floats and lists, ready to
print or to write as JSON. The ten digit captions are the "texts"; text i is
the caption of digit i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HUBNESS_K = 5  # the hubness figures are about top-5 lists: what inference.py shows


def rank_of_label(similarities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, C) similarities -> (N,) 1-based rank of each row's own label among the C columns.

    Ties are broken by column order, as argmax breaks them, so rank 1 is exactly a correct
    prediction: a rank is 1 + the number of columns that score higher, or as high and come first.
    """
    own = similarities.gather(1, labels[:, None])
    columns = torch.arange(similarities.shape[1], device=similarities.device)
    ahead = (similarities > own) | ((similarities == own) & (columns < labels[:, None]))
    return 1 + ahead.sum(dim=1)


def mean_of_present(values: list[float | None]) -> float:
    """The mean over the classes present in the split (those whose value is not None)."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present)


def centred(features: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """`features` less their mean (or the `mean` of the modality they belong to), back on the unit sphere.

    Each modality of a CLIP model fills its own narrow cone, and the two cones sit apart: the
    modality gap (Liang et al., 2022). A caption then lies beyond the edge of its digit's images,
    and the images nearest to it are the most extreme of the digit. Text-to-image retrieval ranks
    by the cosine of centred images and centred captions instead, which returns typical images.
    """
    return F.normalize(features - (features.mean(dim=0) if mean is None else mean), dim=-1)


def zero_shot_classification(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Each image is classified as its most similar caption: top-1 and top-2 accuracy,
    accuracy per digit (None for a digit absent from the split), and the confusion matrix
    (row: true digit, column: predicted)."""
    similarities = image_features @ text_features.T  # (N, C)
    ranks = rank_of_label(similarities, labels)
    predictions = similarities.argmax(dim=1)
    n_classes = len(text_features)
    confusion = torch.bincount(labels * n_classes + predictions, minlength=n_classes**2).view(n_classes, n_classes)
    counts = confusion.sum(dim=1).tolist()
    per_class = [correct / count if count else None for correct, count in zip(confusion.diag().tolist(), counts, strict=True)]
    return {
        "top1_accuracy": (ranks <= 1).float().mean().item(),
        "top2_accuracy": (ranks <= 2).float().mean().item(),
        "per_digit_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def image_to_text(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Each image ranks the captions: recall@1 (the zero-shot accuracy) and the mean rank of its own."""
    ranks = rank_of_label(image_features @ text_features.T, labels).float()
    return {"recall@1": (ranks <= 1).float().mean().item(), "mean_rank": ranks.mean().item()}


def image_retrieval(
    features: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10), hubness_k: int = HUBNESS_K, chunk_size: int = 1024
) -> dict:
    """Each image queries all the others (never itself), ranked by cosine; a neighbour is relevant
    when it shows the same digit.

    precision@k is the share of relevant images among the k first, averaged over queries.
    Average precision averages the precision at the rank of every relevant image, so it
    rewards ranking all of them first; mAP is its mean over the queries that have at least
    one relevant image. `hubness` describes how evenly the images are found (see `hubness`).
    Images that score the same are ranked in the order of the split. Queries are processed
    `chunk_size` at a time, so memory grows as chunk_size x N, never N x N.
    """
    n = len(features)
    if min(ks) < 1 or max(*ks, hubness_k) >= n:
        raise ValueError(f"precision@k needs 0 < k < {n} (the number of other images), got ks={ks} and hubness_k={hubness_k}")
    positions = torch.arange(1, n, device=features.device, dtype=torch.float32)  # ranks 1..N-1
    precision_sums = dict.fromkeys(ks, 0.0)
    ap_sum, ap_queries = 0.0, 0
    occurrences = torch.zeros(n, dtype=torch.long, device=features.device)
    for start in range(0, n, chunk_size):
        queries = features[start : start + chunk_size]
        rows = torch.arange(len(queries), device=features.device)
        similarities = queries @ features.T  # (B, N)
        similarities[rows, start + rows] = -float("inf")  # each query sorts itself last...
        order = similarities.argsort(dim=1, descending=True, stable=True)[:, :-1]  # ...and drops out here
        occurrences += torch.bincount(order[:, :hubness_k].flatten(), minlength=n)
        relevant = (labels[order] == labels[start : start + len(queries), None]).float()  # (B, N-1)
        for k in ks:
            precision_sums[k] += (relevant[:, :k].sum(dim=1) / k).sum().item()
        hits = relevant.cumsum(dim=1)
        n_relevant = hits[:, -1]
        average_precision = (relevant * hits / positions).sum(dim=1) / n_relevant.clamp(min=1)
        ap_sum += average_precision[n_relevant > 0].sum().item()
        ap_queries += int((n_relevant > 0).sum())
    result = {f"precision@{k}": precision_sums[k] / n for k in ks}
    result["mAP"] = ap_sum / max(ap_queries, 1)
    result["hubness"] = hubness(occurrences, hubness_k)
    return result


def hubness(occurrences: torch.Tensor, k: int) -> dict:
    """How evenly retrieval finds the gallery, from each image's k-occurrence: the number of
    top-k lists it appears in (Radovanovic et al., 2010). Every image appears k times on
    average; a "hub" appears in many lists and crowds others out of all of them.

    coverage: the share of images that appear in at least one top-k list (1 at best);
    skewness: of the k-occurrence distribution (0 for a symmetric one; large and positive with hubs);
    max_occurrence: the k-occurrence of the biggest hub.
    """
    counts = occurrences.double()
    deviations = counts - counts.mean()
    spread = deviations.pow(2).mean().sqrt()
    skewness = (deviations.pow(3).mean() / spread.pow(3)).item() if spread > 0 else 0.0
    return {"k": k, "coverage": (occurrences > 0).double().mean().item(), "skewness": skewness, "max_occurrence": int(occurrences.max())}


def text_to_image(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    ks: tuple[int, ...] = (1, 10, 100, 1000),
    centre: bool = True,
) -> dict:
    """Each digit's caption ranks the images, by the cosine of `centred` embeddings unless
    centre=False: precision@k and recall@k per digit and averaged over digits, and the rank
    of the first image of that digit. A digit absent from the split has None for each and is
    left out of the averages.

    recall@k is the share of all that digit's images found in the top k, so it only
    approaches 1 when k nears the number of images per digit (about 1,000 in
    MNIST's test split); a k larger than the split is left out. Images that score the
    same are ranked in the order of the split.
    """
    if centre:
        image_features, text_features = centred(image_features), centred(text_features)
    ks = tuple(k for k in ks if k <= len(labels))
    order = (text_features @ image_features.T).argsort(dim=1, descending=True, stable=True)  # (C, N)
    relevant = labels[order] == torch.arange(len(text_features), device=labels.device)[:, None]
    present = relevant.any(dim=1).tolist()
    n_relevant = relevant.sum(dim=1).clamp(min=1)
    found = {k: relevant[:, :k].sum(dim=1).float() for k in ks}

    def per_digit(values: torch.Tensor) -> list[float | None]:
        return [value if here else None for value, here in zip(values.tolist(), present, strict=True)]

    by_digit = {f"precision@{k}": per_digit(found[k] / k) for k in ks} | {f"recall@{k}": per_digit(found[k] / n_relevant) for k in ks}
    by_digit["first_correct_rank"] = per_digit(relevant.float().argmax(dim=1) + 1.0)
    result = {name: mean_of_present(values) for name, values in by_digit.items() if name != "first_correct_rank"}
    result["mean_first_correct_rank"] = mean_of_present(by_digit["first_correct_rank"])
    result["per_digit"] = by_digit
    return result


def caption_retrieval(image_features: torch.Tensor, caption_features: torch.Tensor, relevant: torch.Tensor, k: int = 10) -> dict:
    """Each caption ranks the images by the cosine of `centred` embeddings; `relevant` (K, N) says
    which images each caption describes. Per caption: precision@k, and its chance level, the share
    of all images that the caption describes."""
    top = (centred(caption_features) @ centred(image_features).T).topk(min(k, image_features.shape[0]), dim=1).indices  # (K, k)
    return {f"precision@{k}": relevant.gather(1, top).float().mean(dim=1).tolist(), "chance": relevant.float().mean(dim=1).tolist()}


def similarity_gap(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Mean cosine of each image with its own caption versus with the other captions."""
    similarities = image_features @ text_features.T
    matching = torch.zeros_like(similarities, dtype=torch.bool)
    matching[torch.arange(len(labels)), labels] = True
    matching_mean, non_matching_mean = similarities[matching].mean().item(), similarities[~matching].mean().item()
    return {"matching": matching_mean, "non_matching": non_matching_mean, "gap": matching_mean - non_matching_mean}


def modality_gap(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, k: int = HUBNESS_K) -> dict:
    """Where the captions sit beside their digits' images (Liang et al., 2022, "Mind the Gap"),
    and how typical of its digit each image is that a caption retrieves.

    caption_to_centroid: per digit, the cosine distance (1 - cosine) from its caption to the
    direction of the mean of its images; image_to_centroid: the median of that distance over
    the digit's own images, for scale. returned_percentile: per caption, for each of its k
    nearest images, the share (in %) of that image's digit lying closer to their centroid than
    it does, averaged: 50 for typical images, near 100 for the strangest; for text-to-image
    retrieval by centred embeddings, and by the plain cosine. A digit absent from the split has None.
    """
    n_classes = len(text_features)
    to_caption, to_own = [None] * n_classes, [None] * n_classes
    distance = torch.zeros(len(labels), device=image_features.device)  # each image's from its digit's centroid
    for digit in labels.unique().tolist():
        members = labels == digit
        centroid = F.normalize(image_features[members].mean(dim=0), dim=0)
        distance[members] = 1 - image_features[members] @ centroid
        to_caption[digit] = 1 - (text_features[digit] @ centroid).item()
        to_own[digit] = distance[members].median().item()

    def returned_percentiles(images: torch.Tensor, texts: torch.Tensor) -> list[float | None]:
        returned = (texts @ images.T).topk(min(k, len(labels)), dim=1).indices  # (C, k)
        return [
            100 * sum((distance[labels == labels[i]] < distance[i]).float().mean().item() for i in row) / len(row)
            if own is not None
            else None
            for row, own in zip(returned.tolist(), to_own, strict=True)
        ]

    centred_ranking = returned_percentiles(centred(image_features), centred(text_features))
    cosine_ranking = returned_percentiles(image_features, text_features)
    return {
        "caption_to_centroid": to_caption,
        "image_to_centroid": to_own,
        "returned_percentile": centred_ranking,
        "mean_returned_percentile": mean_of_present(centred_ranking),
        "returned_percentile_by_cosine": cosine_ranking,
        "mean_returned_percentile_by_cosine": mean_of_present(cosine_ranking),
    }


def evaluate_embeddings(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor) -> dict:
    """All of the above for one split, grouped as metrics.json stores them."""
    return {
        "zero_shot": zero_shot_classification(image_features, text_features, labels),
        "image_to_image": image_retrieval(image_features, labels),
        "text_to_image": text_to_image(image_features, text_features, labels),
        "text_to_image_by_cosine": text_to_image(image_features, text_features, labels, centre=False),
        "image_to_text": image_to_text(image_features, text_features, labels),
        "similarity": similarity_gap(image_features, text_features, labels),
        "modality_gap": modality_gap(image_features, text_features, labels),
    }
