"""Image files of the extract stage: the dataset errors, reading one image, and the checks that every image file
of a dataset can be read (and is reached once) before any of them is encoded.

Nothing here knows a dataset's layout or protocol: :mod:`extract.datasets.sources` builds the sample sources on
these readers, :mod:`extract.datasets.protocols` the datasets.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image


class DatasetError(Exception):
    """A dataset's data root is missing, malformed, or cannot be downloaded."""


class DataAbsentError(DatasetError):
    """The data is not there: no such ``--data-root``, none given where one is needed, or a torchvision dataset not
    found and not downloadable."""


class ImageReadError(Exception):
    """An image file could not be decoded; the message names the file."""


def load_image(path: str) -> Image.Image:
    """Open an image file fully (decode now, so a truncated file fails here): :func:`read_image` of the file.

    Raises:
        ImageReadError: the file cannot be read or decoded; the message names it.
    """
    try:
        with open(path, "rb") as handle:
            return read_image(handle, path)
    except OSError as err:
        raise ImageReadError(f"cannot read image {path}: {_reason(err)}") from None


def read_image(handle: BinaryIO, name: str) -> Image.Image:
    """Decode the image in an open binary file (or an upload's bytes in a ``BytesIO``) fully, as 8-bit RGB or
    grayscale: 16-bit grayscale keeps its top 8 bits, other modes (RGBA, palette, CMYK) become RGB.

    Raises:
        ImageReadError: ``cannot read image <name>: <reason>``: not an image, truncated, 32-bit, or any error of
            PIL's (a decompression-bomb warning too, where the caller makes warnings errors).
    """
    try:
        image = Image.open(handle)
        image.load()
    except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        raise ImageReadError(f"cannot read image {name}: {_reason(err)}") from None
    return eight_bit(image, name)


def eight_bit(image: Image.Image, name: str) -> Image.Image:
    """A decoded image as 8-bit RGB or grayscale, the one rule for files, uploads and PIL images given in memory:
    16-bit grayscale keeps its top 8 bits (PIL's ``convert`` would clip it), other modes (RGBA, palette, CMYK,
    bilevel) become RGB.

    Raises:
        ImageReadError: ``cannot read image <name>: ...`` for a 32-bit image (``I``, ``F``): no defined 8-bit range.
    """
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode in ("I", "F"):
        raise ImageReadError(f"cannot read image {name}: {image.mode!r} (32-bit) images have no defined 8-bit range")
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def _reason(err: Exception) -> str:
    """PIL's message for an unreadable file, without the repr of the file handle that some of them hold."""
    return re.sub(r"\s*<_io\.\w+ (name=.*?|object at 0x[0-9a-f]+)>", "", str(err)).strip() or type(err).__name__


#: What to do about an unreadable image met by an extraction that may have committed chunks: rerunning alone
#: meets the same file again, and removing it changes the image list, which a resume refuses.
RESUME_ADVICE = ("replace it with a readable image and run the same command again to resume, or remove it and run "
                 "again with --overwrite to start over (the image list changes)")


def load_dataset_image(path: str) -> Image.Image:
    """:func:`load_image` for the images of a dataset being extracted: the error also says what to do.

    Raises:
        ImageReadError: the file cannot be read or decoded; the message names it and gives ``RESUME_ADVICE``.
    """
    try:
        return load_image(path)
    except ImageReadError as err:
        raise ImageReadError(f"{err}; {RESUME_ADVICE}") from None


def _visible_image(path: str, root: str | None = None) -> bool:
    """An image file by extension (torchvision's ``IMG_EXTENSIONS``) that is not hidden: neither its name (``.x``,
    e.g. macOS ``._x.png`` resource forks) nor, with ``root``, a folder between ``root`` and it (a class folder's
    ``.ipynb_checkpoints/``) starts with a dot."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    parts = Path(os.path.relpath(path, root)).parts if root is not None else (os.path.basename(path),)
    return not any(part.startswith(".") for part in parts) and has_file_allowed_extension(path, IMG_EXTENSIONS)


def check_unique_files(root: Path, paths: list[str], option: str = "--data-root") -> None:
    """Refuse an image file reached twice (a directory link, a loop, or a file linked into both splits).

    Raises:
        DatasetError: names the file and both paths.
    """
    seen: dict[str, str] = {}
    for path in paths:  # ImageFolder follows directory links: a loop would repeat images
        real = os.path.realpath(path)
        if real in seen:
            raise DatasetError(f"{option} {root}: the image {real} is reached twice ({seen[real]} and {path}); "
                               "remove the duplicate or the link")
        seen[real] = path


def _few(names: list[str], most: int = 5) -> str:
    return "none" if not names else ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most
                                                                else "")


def _image_problem(path: str) -> str | None:
    """Why :func:`load_image` would refuse ``path``, or None when it would read it.

    The whole file is decoded, JPEGs at reduced scale (``draft``: the entropy-coded data is still read to its end,
    so a truncated file fails; the inverse DCT runs on 1/8 of the pixels). A header check (``Image.open`` and
    ``verify``) would be cheaper but lets truncated JPEGs through: PIL's ``verify`` checks PNG chunk CRCs only.
    """
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.draft("RGB", (64, 64))
            image.load()
    except Exception as err:  # PIL raises several types for bad files; a dangling link raises OSError
        return _reason(err)
    if image.mode in ("I", "F"):  # load_image refuses 32-bit images
        return f"{image.mode!r} (32-bit) images have no defined 8-bit range"
    return None


def _image_problems(paths: list[str], progress: bool = False) -> list[str | None]:
    """:func:`_image_problem` of every path, in order, decoded by a few threads (PIL decodes without the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(tqdm(pool.map(_image_problem, paths, chunksize=64), total=len(paths), desc="check images",
                         unit="image", disable=not progress or not paths, leave=False))


def _readable(paths: list[str]) -> list[bool]:
    return [problem is None for problem in _image_problems(paths)]


def check_readable(paths: list[str], progress: bool = False, resumed: bool = False) -> None:
    """Refuse image files that :func:`load_image` cannot read, before any of them is encoded (see
    :func:`_image_problem` for what is decoded and why). Every file is tried, so that one run names them all.

    Cost, measured on CIFAR-10's 60,000 32 x 32 JPEGs (in the page cache, 2 shared cores): 7.4 s (0.1 ms an image;
    a header check, ``Image.open`` + ``verify``, takes 2 s but passes truncated JPEGs), next to minutes of backbone
    passes for the same images. Large PNGs, which cannot be decoded at reduced scale, cost a full decode each.

    Args:
        paths: the files.
        progress: show a progress bar.
        resumed: committed chunks of the extraction exist (the advice then says how to keep them).

    Raises:
        ImageReadError: names the first unreadable file and why, how many there are, and what to do.
    """
    bad = [(path, problem) for path, problem in zip(paths, _image_problems(paths, progress), strict=True)
           if problem is not None]
    if not bad:
        return
    (first, reason), more = bad[0], [path for path, _ in bad[1:]]
    also = f" (and {len(more)} more unreadable: {_few(more, 3)})" if more else ""
    advice = RESUME_ADVICE if resumed else (f"remove or replace {'them' if more else 'it'}, then run the same "
                                            "command again")
    raise ImageReadError(f"cannot read image {first}: {reason}{also}; {advice}")
