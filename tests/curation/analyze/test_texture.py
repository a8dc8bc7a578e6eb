import cv2
import numpy as np

from curation.analyze.texture import flat_fraction, gray_entropy


def _reference_flat_fraction(gray, patch=240, thr=800.0):
    r, c = gray.shape[0] // patch, gray.shape[1] // patch
    dx = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3)
    dy = cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3)
    mag = np.sqrt(dx * dx + dy * dy)[: r * patch, : c * patch]
    var = mag.reshape(r, patch, c, patch).var(axis=(1, 3))
    return float((var < thr).mean())


def test_flat_fraction_matches_the_paper_definition():
    rng = np.random.default_rng(0)
    gray = np.zeros((1000, 1500), np.uint8)
    gray[:, 700:] = cv2.GaussianBlur((rng.random((1000, 800)) * 255).astype(np.uint8), (0, 0), 1.0)
    got = flat_fraction(gray)
    assert got == _reference_flat_fraction(gray)
    assert 0.3 < got < 0.7  # left half is flat, right half textured
    assert flat_fraction(np.full((480, 480), 128, np.uint8)) == 1.0
    assert flat_fraction(np.zeros((100, 100), np.uint8)) == 1.0  # smaller than one patch


def test_flat_fraction_variance_threshold_is_configurable():
    rng = np.random.default_rng(1)
    gray = cv2.GaussianBlur((rng.random((480, 480)) * 255).astype(np.uint8), (0, 0), 2.0)
    assert flat_fraction(gray, flat_variance=1e9) == 1.0
    assert flat_fraction(gray, flat_variance=0.0) == 0.0


def test_entropy_is_shannon_bits_of_the_histogram():
    assert gray_entropy(np.full((64, 64), 7, np.uint8)) == 0.0
    two = np.zeros((64, 64), np.uint8)
    two[:32] = 255
    assert abs(gray_entropy(two) - 1.0) < 1e-9
    uniform = np.arange(256, dtype=np.uint8).repeat(16).reshape(64, 64)
    assert abs(gray_entropy(uniform) - 8.0) < 1e-9


def test_flat_fraction_equals_the_float64_definition_across_thresholds():
    """Every patch's decision matches float64, whichever bound (or the exact path) decides it."""
    rng = np.random.default_rng(2)
    noise = (rng.random((720, 1200)) * 255).astype(np.uint8)
    for sigma in (0.6, 1.5, 4.0):
        gray = cv2.GaussianBlur(noise, (0, 0), sigma)
        gray[:, ::97] = 255  # thin lines: heavy-tailed gradients in some patches
        for patch in (60, 240):
            ref = [_reference_flat_fraction(gray, patch, t) for t in (10.0, 800.0, 5000.0)]
            got = [flat_fraction(gray, patch=patch, flat_variance=t) for t in (10.0, 800.0, 5000.0)]
            assert got == ref
        # thresholds right at a patch's variance: the undecided path must agree too
        dx = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3)
        dy = cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3)
        var = np.sqrt(dx * dx + dy * dy)[:240, :240].var()
        for t in (var * (1 - 1e-6), var * (1 + 1e-6)):
            assert flat_fraction(gray, flat_variance=t) == _reference_flat_fraction(gray, 240, t)


def test_one_grey_level_has_zero_entropy_not_minus_zero():
    """A blank image's entropy was -0.0 (printed so in the manifest and stats)."""
    import math

    e = gray_entropy(np.full((64, 64), 7, np.uint8))
    assert e == 0.0 and math.copysign(1.0, e) == 1.0 and str(e) == "0.0"
