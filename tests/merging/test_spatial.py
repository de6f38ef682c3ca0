"""MustDrop's spatial merge against a plain reference written from its code."""

import itertools

import torch

from turbo.merging.spatial import spatial_merge, window_similarity


def reference_merge(hidden: torch.Tensor, grid: tuple[int, int], window: int, threshold: float) -> torch.Tensor:
    """Loops over windows and token pairs; batch 1."""
    height, width = grid
    patches = hidden[0, 1:]
    windows = [[(row * window + i) * width + col * window + j for i in range(window) for j in range(window)]
               for row in range(height // window) for col in range(width // window)]
    scores = []
    for members in windows:
        pairs = [torch.cosine_similarity(patches[a], patches[b], dim=0)
                 for a, b in itertools.permutations(members, 2)]
        scores.append(float(sum(pairs) / len(pairs)))
    chosen = sorted((n for n in range(len(windows)) if scores[n] >= threshold), key=lambda n: -scores[n])
    merged = [patches[windows[n]].mean(dim=0) for n in chosen]
    taken = {index for n in chosen for index in windows[n]}
    rest = [patches[index] for index in range(height * width) if index not in taken]
    return torch.stack([hidden[0, 0], *merged, *rest])[None]


def test_spatial_merge_equals_the_reference():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 1 + 6 * 9, 8, generator=g)
    hidden[0, 1:] += 2 * torch.randn(8, generator=g)  # a shared direction: some windows similar, some not
    scores = window_similarity(hidden[:, 1:], (6, 9), 3)[0]
    threshold = float(scores.median())  # about half the windows
    got = spatial_merge(hidden, (6, 9), 3, threshold)
    want = reference_merge(hidden, (6, 9), 3, threshold)
    assert 1 + 54 - 8 * 5 <= got.shape[1] <= 1 + 54 - 8  # of 6 windows, some merged, some not
    torch.testing.assert_close(got, want)
    assert spatial_merge(hidden, (6, 9), 3, 1.1).shape == hidden.shape  # nothing that similar
    assert spatial_merge(hidden, (6, 9), 3, -1.0).shape[1] == 1 + 6  # every window one token


def test_a_batch_merges_as_many_windows_as_its_row_with_fewest():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 1 + 36, 4, generator=g)
    hidden[0, 1:] += 3 * torch.randn(4, generator=g)  # row 0 similar everywhere, row 1 not
    fewest = int((window_similarity(hidden[:, 1:], (6, 6), 3) >= 0.5).sum(dim=1).min())
    assert spatial_merge(hidden, (6, 6), 3, 0.5).shape[1] == 1 + 36 - 8 * fewest
