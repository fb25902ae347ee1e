"""Which lister lists a prefix, by its filesystem: S3 (pipeline/planning/listing.py), GCS (listing_gcs.py) and
Azure (listing_azure.py) page by page with many requests in flight; anything else (local, NFS)
with `fs.find`. Its own module: the GCS and Azure listers use listing.py's helpers, so listing.py
may not import them."""
from __future__ import annotations

from pipeline.planning import listing

from .listing import Columns
from .listing_azure import AzureLister
from .listing_gcs import GCSLister


def list_prefix(fs, path: str, skipped: dict[str, int] | None = None) -> Columns:
    """(image_ids, uris, etags, sizes) of the image keys below `path` (ids relative to it);
    `skipped` counts the other keys by extension."""
    if (lister := range_lister(fs)) is not None:
        return lister(fs).list(path, skipped)
    if "abfs" in _protocols(fs):  # adlfs
        return AzureLister(fs).list(path, skipped)
    return listing.list_prefix(fs, path, skipped)


def range_lister(fs) -> type[listing.RangeLister] | None:
    """The lister that lists `fs` by key ranges, in parts as it lists (S3, GCS), or None."""
    if hasattr(fs, "_call_s3"):  # s3fs
        return listing.S3Lister
    if "gs" in _protocols(fs):  # gcsfs
        return GCSLister
    return None


def _protocols(fs) -> tuple[str, ...]:
    protocols = getattr(fs, "protocol", ())
    return (protocols,) if isinstance(protocols, str) else tuple(protocols)
