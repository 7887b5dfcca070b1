"""Video -> clips of frames (one example = `frames_per_clip` frames, `stride` frames apart).

`path` may be a video file, a folder of frame images (one video), or a folder holding video files
and/or frame folders (one video each). Video files are decoded with PyAV, whose wheels bundle
FFmpeg: the optional `video` extra (pip install 'delvm[video]'); frame folders need nothing more.
Frames are named in natural order (frame_2 before frame_10). Clips start every `clip_step`
frames (default: back to back, no frame in two clips). A frame that cannot be read is reported
and the clip around it dropped; the next clip starts after it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from delvm.data.example import Example, Skipped
from delvm.data.images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS
from delvm.data.sources.common import Source, load_or_skip
from delvm.errors import DelvmError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=_natural_key)


def _pyav(video: Path):  # -> the av module
    """PyAV, imported where a video file is read (the `video` extra)."""
    try:
        import av
    except ImportError:
        raise DelvmError(
            f"{video}: reading video files needs PyAV: pip install 'delvm[video]' "
            "(or give the video as a folder of its frames)"
        ) from None
    return av


def _video_frames(path: Path) -> Iterator[tuple[str, np.ndarray | Skipped]]:
    """(frame number, RGB frame) of a video file; a decoding failure ends it with a Skipped."""
    av = _pyav(path)
    decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                yield str(path), Skipped(str(path), "no video stream")
                return
            stream = container.streams.video[0]
            if stream.codec_context.width * stream.codec_context.height > MAX_IMAGE_PIXELS:
                yield str(path), Skipped(str(path), "frame size exceeds the pixel limit")
                return
            for frame in container.decode(stream):
                yield str(decoded), frame.to_ndarray(format="rgb24")
                decoded += 1
    except (av.FFmpegError, OSError, ValueError) as err:
        yield str(path), Skipped(str(path), f"cannot decode after {decoded} frames ({err})")


def _folder_frames(files: list[Path]) -> Iterator[tuple[str, np.ndarray | Skipped]]:
    """(file name, RGB frame) of a frame folder."""
    for path in files:
        yield path.name, load_or_skip(path)


def _clips(
    video: str,
    frames: Iterable[tuple[str, np.ndarray | Skipped]],
    task: str,
    frames_per_clip: int,
    stride: int,
    clip_step: int,
) -> Iterator[Example | Skipped]:
    """Cut clips from a frame stream, holding only the frames of the clip being filled."""
    span = (frames_per_clip - 1) * stride + 1
    held: dict[int, tuple[str, np.ndarray]] = {}
    start = 0  # stream index of the pending clip's first frame
    for index, (name, frame) in enumerate(frames):
        if isinstance(frame, Skipped):
            yield frame
            # A clip never straddles a missing frame: start again after it.
            held, start = {}, max(start, index + 1)
            continue
        if index < start:
            continue
        held[index] = (name, frame)
        if index < start + span - 1:
            continue
        picked = [held[start + k * stride] for k in range(frames_per_clip)]
        shapes = sorted({f.shape for _, f in picked})
        if len(shapes) == 1:
            yield Example(
                task,
                [f for _, f in picked],
                source=f"{video}#frames={picked[0][0]}..{picked[-1][0]}",
                meta={"nearest": [False] * frames_per_clip},
            )
        else:
            yield Skipped(
                f"{video}#frame={picked[0][0]}", f"frames of one clip differ in size {shapes}"
            )
        start += clip_step
        held = {i: v for i, v in held.items() if i >= start}


def _videos(path: Path) -> list[tuple[Path, list[Path] | None]]:
    """(video, its frame files; None for a video file) for each video under `path`."""
    if path.is_file():
        return [(path, None)]
    if not path.is_dir():
        raise DelvmError(f"{path}: no such video file or folder (video source: check `path`)")
    own_frames = _frame_files(path)
    if own_frames:
        return [(path, own_frames)]
    videos = []
    for child in sorted(path.iterdir(), key=_natural_key):
        if child.is_file() and child.suffix.lower() in VIDEO_SUFFIXES:
            videos.append((child, None))
        elif child.is_dir() and (frames := _frame_files(child)):
            videos.append((child, frames))
    if not videos:
        raise DelvmError(f"{path}: no video files ({', '.join(VIDEO_SUFFIXES)}) or frame folders")
    return videos


def _read_video(
    unit: tuple[Path, list[Path] | None], task: str, frames_per_clip: int, stride: int, step: int
) -> Iterator[Example | Skipped]:
    video, files = unit
    frames = _video_frames(video) if files is None else _folder_frames(files)
    yield from _clips(str(video), frames, task, frames_per_clip, stride, step)


def iter_video(
    path: str | Path,
    frames_per_clip: int = 4,
    stride: int = 1,
    clip_step: int | None = None,
    task: str = "video",
) -> Source:
    """Clips of `frames_per_clip` frames, `stride` apart, from the videos under `path`.

    Each video is one unit of a build's work: its clips are cut by one worker.
    """
    if frames_per_clip < 1 or stride < 1 or (clip_step is not None and clip_step < 1):
        raise DelvmError("video source: frames_per_clip, stride and clip_step must be >= 1")
    step = clip_step or (frames_per_clip - 1) * stride + 1
    read = partial(
        _read_video, task=task, frames_per_clip=frames_per_clip, stride=stride, step=step
    )
    videos = _videos(Path(path))
    files = [video for video, frames in videos if frames is None]
    if files:
        _pyav(files[0])  # a missing PyAV is refused here, before a build's workers start
    return Source(videos, read)
