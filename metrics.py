"""Measurements of a CLIP embedding space, as CLIP papers report them.

Every function takes unit-norm embeddings (so a dot product is a cosine) and
integer labels as torch tensors, and returns plain floats and lists, ready to
print or to write as JSON. For labelled images the ten digit captions are the
"texts", text i the caption of digit i; for image-caption collections (a few
captions per image, as Flickr8k), `image_caption_retrieval` ranks each image's
own captions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HUBNESS_K = 5  # the hubness figures are about top-5 lists: what inference.py shows
RECALL_AT = (1, 5, 10)  # the recalls that image-caption retrieval is reported at (Flickr8k, Flickr30k, COCO)


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
    per_class = [
        correct / count if count else None for correct, count in zip(confusion.diag().tolist(), counts, strict=True)
    ]
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
    features: torch.Tensor,
    labels: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    hubness_k: int = HUBNESS_K,
    chunk_size: int = 1024,
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
        raise ValueError(
            f"precision@k needs 0 < k < {n} (the number of other images), got ks={ks} and hubness_k={hubness_k}"
        )
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
    return {
        "k": k,
        "coverage": (occurrences > 0).double().mean().item(),
        "skewness": skewness,
        "max_occurrence": int(occurrences.max()),
    }


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

    by_digit = {f"precision@{k}": per_digit(found[k] / k) for k in ks} | {
        f"recall@{k}": per_digit(found[k] / n_relevant) for k in ks
    }
    by_digit["first_correct_rank"] = per_digit(relevant.float().argmax(dim=1) + 1.0)
    result = {name: mean_of_present(values) for name, values in by_digit.items() if name != "first_correct_rank"}
    result["mean_first_correct_rank"] = mean_of_present(by_digit["first_correct_rank"])
    result["per_digit"] = by_digit
    return result


def caption_retrieval(
    image_features: torch.Tensor, caption_features: torch.Tensor, relevant: torch.Tensor, k: int = 10
) -> dict:
    """Each caption ranks the images by the cosine of `centred` embeddings; `relevant` (K, N) says
    which images each caption describes. Per caption: precision@k, and its chance level, the share
    of all images that the caption describes."""
    top = (
        (centred(caption_features) @ centred(image_features).T).topk(min(k, image_features.shape[0]), dim=1).indices
    )  # (K, k)
    return {
        f"precision@{k}": relevant.gather(1, top).float().mean(dim=1).tolist(),
        "chance": relevant.float().mean(dim=1).tolist(),
    }


def similarity_gap(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Mean cosine of each image with its own caption versus with the other captions."""
    similarities = image_features @ text_features.T
    matching = torch.zeros_like(similarities, dtype=torch.bool)
    matching[torch.arange(len(labels)), labels] = True
    matching_mean, non_matching_mean = similarities[matching].mean().item(), similarities[~matching].mean().item()
    return {"matching": matching_mean, "non_matching": non_matching_mean, "gap": matching_mean - non_matching_mean}


def modality_gap(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, k: int = HUBNESS_K
) -> dict:
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


def caption_relevance(
    caption_image: torch.Tensor, caption_text: torch.Tensor, images: range, captions: range
) -> torch.Tensor:
    """(len(images), len(captions)) bool: whether each caption of the `captions` range is relevant to each image
    of the `images` range, that is whether its text is one of that image's captions' texts.

    Only the texts of those captions are tabulated against those images, so a block of rows never needs a
    table of every image by every text.
    """
    texts, column = caption_text[captions.start : captions.stop].unique(return_inverse=True)
    row = caption_image - images.start
    # The captions that give an image of the range one of these texts: each marks that (image, text) pair.
    marks = torch.isin(caption_text, texts) & (row >= 0) & (row < len(images))
    has_text = torch.zeros(len(images), len(texts), dtype=torch.bool, device=caption_text.device)
    has_text[row[marks], torch.searchsorted(texts, caption_text[marks])] = True
    return has_text[:, column]


def rank_of_relevant(similarities: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """(Q, M) similarities and relevance -> (Q,) 1-based rank of each row's best-ranked relevant column:
    1 + the number of non-relevant columns that score at least as high as it.

    Ties count against the query, unlike `rank_of_label`'s: a collapsed model, whose scores are all
    equal, then gets the worst rank rather than a perfect one. A row needs at least one relevant column.
    """
    best = similarities.masked_fill(~relevant, -float("inf")).amax(dim=1, keepdim=True)
    return 1 + ((similarities >= best) & ~relevant).sum(dim=1)


def rank_summary(ranks: torch.Tensor) -> dict:
    """recall@k (the share of queries ranked k or better) for each k of RECALL_AT, and the median rank (the mean
    of the two middle ones for an even count) and mean rank."""
    ranks = ranks.double()
    recalls = {f"recall@{k}": (ranks <= k).double().mean().item() for k in RECALL_AT}
    return recalls | {"median_rank": ranks.quantile(0.5).item(), "mean_rank": ranks.mean().item()}


def image_caption_retrieval(
    image_features: torch.Tensor,
    caption_features: torch.Tensor,
    caption_image: torch.Tensor,
    caption_text: torch.Tensor,
    chunk_size: int = 1024,
) -> dict:
    """Image-to-text and text-to-image retrieval on an image-caption collection (N images, K captions, a few
    per image as in Flickr8k), as CLIP papers report it.

    caption_image (K,): the image each caption belongs to; caption_text (K,): an id of each caption's string,
    shared by identical strings. Caption k is relevant to image i when its text is one of image i's captions'
    texts: training treats identical captions as interchangeable positives, so evaluation does too. With
    distinct strings this is exactly "caption k belongs to image i", the standard Flickr8k measure.

    image_to_text: each image ranks the distinct caption texts, and its rank is that of its best-ranked relevant
    text; copies of one text are one caption (in a real model they have one embedding; otherwise the best of
    them counts), so a wrong caption that many images share is one caption ahead, not one per copy.
    text_to_image: each caption ranks all N images, and its rank is that of its best-ranked relevant image.
    A rank is 1 + the number of non-relevant items scoring at least as high (see `rank_of_relevant`).
    Each direction reports recall@1, 5 and 10 (fractions), and the median and mean rank; rsum is the sum
    of the six recalls in percent (0 to 600). similarity: the mean cosine of the relevant (image, caption)
    pairs and of the others (nan if there are none), and their gap. Rows are processed `chunk_size` at a
    time, so memory grows as chunk_size x max(N, K), never N x K.
    """
    n, k = len(image_features), len(caption_features)
    if k and (caption_image.min() < 0 or caption_image.max() >= n):
        raise ValueError(f"caption_image must name images 0 to {n - 1}")
    captionless = int((torch.bincount(caption_image, minlength=n) == 0).sum())
    if captionless:
        raise ValueError(
            f"{captionless} of the {n} images have no caption: image-to-text retrieval needs at least one for each"
        )
    texts, text_column = caption_text.unique(return_inverse=True)
    image_ranks, caption_ranks = [], []
    matching_sum, total_sum, n_matching = 0.0, 0.0, 0
    for start in range(0, n, chunk_size):
        images = range(start, min(start + chunk_size, n))
        similarities = image_features[images.start : images.stop] @ caption_features.T  # (B, K)
        relevant = caption_relevance(caption_image, caption_text, images, range(k))
        # Each distinct text's best copy, and whether it is relevant: (B, T).
        columns = text_column.expand(len(images), -1)
        text_scores = similarities.new_full((len(images), len(texts)), -float("inf")).scatter_reduce(
            1, columns, similarities, "amax"
        )
        text_relevant = torch.zeros_like(text_scores, dtype=torch.bool).scatter_reduce(1, columns, relevant, "amax")
        image_ranks.append(rank_of_relevant(text_scores, text_relevant))
        matching_sum += torch.where(relevant, similarities, 0).sum(dtype=torch.float64).item()
        total_sum += similarities.sum(dtype=torch.float64).item()
        n_matching += int(relevant.sum())
    for start in range(0, k, chunk_size):
        captions = range(start, min(start + chunk_size, k))
        similarities = caption_features[captions.start : captions.stop] @ image_features.T  # (B, N)
        caption_ranks.append(
            rank_of_relevant(similarities, caption_relevance(caption_image, caption_text, range(n), captions).T)
        )
    image_to_text, text_to_image = rank_summary(torch.cat(image_ranks)), rank_summary(torch.cat(caption_ranks))
    matching = matching_sum / n_matching
    non_matching = (total_sum - matching_sum) / (n * k - n_matching) if n * k > n_matching else float("nan")
    return {
        "images": n,
        "captions": k,
        "image_to_text": image_to_text,
        "text_to_image": text_to_image,
        "rsum": 100 * sum(ranks[f"recall@{at}"] for ranks in (image_to_text, text_to_image) for at in RECALL_AT),
        "similarity": {"matching": matching, "non_matching": non_matching, "gap": matching - non_matching},
    }


def rsum_line(result: dict) -> str:
    """One line of `image_caption_retrieval`'s result: RSum, then each direction's recalls in % and median rank."""
    ats = "/".join(map(str, RECALL_AT))

    def direction(name: str, ranks: dict) -> str:
        recalls = "/".join(f"{100 * ranks[f'recall@{at}']:.1f}" for at in RECALL_AT)
        return f"{name} R@{ats} {recalls}% (median rank {ranks['median_rank']:g})"

    both_ways = [direction("image→text", result["image_to_text"]), direction("text→image", result["text_to_image"])]
    return f"RSum {result['rsum']:.1f}; {'; '.join(both_ways)}"
