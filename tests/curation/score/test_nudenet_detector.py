import os

import pytest

from curation import schema
from curation.analyze.pixel_analyzer import decode
from curation.score.nudenet_detector import NudeNetDetector, scores_of

pytest.importorskip("nudenet", reason="the opt-in 'nsfw' extra is not installed")


def _astronaut() -> bytes:
    """scikit-image's astronaut.png: a real photograph of a person (NASA, public domain)."""
    skdata = pytest.importorskip("skimage.data")
    return open(os.path.join(os.path.dirname(skdata.__file__), "astronaut.png"), "rb").read()


def test_a_face_makes_a_character_and_landscapes_do_not(real_thumbnails):
    thumbs = [decode(_astronaut(), 1, 512)[1], *real_thumbnails, None]
    out = NudeNetDetector(character_threshold=0.5)(
        {schema.SOURCE: [str(i) for i in range(len(thumbs))], schema.THUMBNAIL: thumbs}
    )
    person = out[schema.PERSON_SCORE].to_pylist()
    assert person[0] > 0.5 and out[schema.CHARACTER][0].as_py() is True
    assert all(p == 0.0 for p in person[1:-1])  # Debian's landscapes: nobody there
    assert out[schema.CHARACTER].to_pylist()[1:] == [False] * len(real_thumbnails) + [None]
    assert out[schema.NSFW].to_pylist()[:-1] == [0.0] * (len(thumbs) - 1)


def test_the_detector_runs_at_the_resolution_asked(real_thumbnails):
    """nudenet's 640m model runs at 640 px (`models.nudenet_resolution`); every model ran at
    320, nudenet's default, whatever weights were given."""
    thumb = decode(_astronaut(), 1, 640)[1]
    stage = NudeNetDetector(resolution=640)
    out = stage({schema.SOURCE: ["a"], schema.THUMBNAIL: [thumb]})
    assert stage._detector.input_width == stage._detector.input_height == 640
    assert out[schema.CHARACTER][0].as_py() is True  # the face is still found


def test_only_the_asked_columns_are_written(real_thumbnails):
    out = NudeNetDetector(person=False)({schema.THUMBNAIL: real_thumbnails[:1]})
    assert schema.NSFW in out.column_names and schema.PERSON_SCORE not in out.column_names


def test_scores_of_detections():
    dets = [
        {"class": "FACE_MALE", "score": 0.8},
        {"class": "FEMALE_BREAST_EXPOSED", "score": 0.6},
        {"class": "BELLY_EXPOSED", "score": 0.9},
    ]
    assert scores_of(dets) == (0.9, 0.6)
    assert scores_of([]) == (0.0, 0.0)
