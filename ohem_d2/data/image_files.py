"""What Detectron2 will find in an image file, learnt from its header and its last bytes.

Checking a dataset before training must not cost a decode of every image. ``PIL.Image.open``
reads only the header (format, size, EXIF), and a file cut short in a download or a copy is
recognised by its end: a complete JPEG ends with the end-of-image marker, a complete PNG with its
IEND chunk. Only a file whose end looks wrong is decoded, to tell a truncated file (which
Detectron2's ``read_image`` fails on) from one with harmless bytes after its end marker.
"""
import os
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# The EXIF orientations that Detectron2's read_image undoes by a transpose or a 90-degree
# rotation (detection_utils._apply_exif_orientation), so that width and height trade places.
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 274
# How a complete file of each format ends.
_END_MARKERS = {
    "JPEG": b"\xff\xd9",  # EOI
    "MPO": b"\xff\xd9",  # the EOI of its last picture
    "PNG": b"\x00\x00\x00\x00IEND\xaeB`\x82",  # the empty IEND chunk with its CRC
}
_END_DESCRIPTIONS = {"JPEG": "the JPEG end marker FF D9", "MPO": "the JPEG end marker FF D9",
                     "PNG": "the PNG IEND chunk"}


@dataclass(frozen=True)
class ImageHeader:
    """The size Detectron2 will see (after EXIF orientation), or why it will not read the file."""

    width: int = 0
    height: int = 0
    orientation: int = 1  # EXIF orientation, 1 when the file has none
    problem: str = ""  # "" for a readable file; else "unreadable: ..." or "truncated: ..."


def read_image_header(path):
    """The header of the image at ``path`` (an existing file) as Detectron2's read_image uses it."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            width, height = image.size
            orientation = _orientation(image)
            end = _END_MARKERS.get(image.format)
            if end and os.fstat(f.fileno()).st_size >= len(end):
                f.seek(-len(end), os.SEEK_END)
                complete = f.read() == end
            else:
                complete = True
    except UnidentifiedImageError:
        return ImageHeader(problem="unreadable: not an image file that PIL can identify")
    except (OSError, Image.DecompressionBombError) as e:  # e.g. a file that ends inside its header
        return ImageHeader(problem=f"unreadable: PIL cannot read its header: {e}")
    if not complete and not _decodes(path):
        return ImageHeader(problem=f"truncated: it does not end with {_END_DESCRIPTIONS[image.format]}")
    if orientation in SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageHeader(width, height, orientation)


def _orientation(image):
    # Image.getexif of the base class reads the EXIF (or XMP) orientation that the header holds;
    # PngImageFile.getexif would decode the pixels to look for an eXIf chunk after them, where
    # writers do not put it. Detectron2 treats an EXIF it cannot parse as none; so does this.
    try:
        return Image.Image.getexif(image).get(_EXIF_ORIENTATION_TAG) or 1
    except Exception:  # noqa: BLE001 - the same catch-all as detection_utils._apply_exif_orientation
        return 1


def _decodes(path):
    """True if PIL decodes the whole file, as Detectron2's read_image will (bytes after the end
    marker are harmless; a file cut short raises ``OSError: image file is truncated``)."""
    try:
        with Image.open(path) as image:
            image.load()
    except OSError:
        return False
    return True
