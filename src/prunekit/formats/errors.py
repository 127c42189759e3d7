"""The one error type a prunekit file reader raises."""

from __future__ import annotations

__all__ = ["FormatError"]


class FormatError(ValueError):
    """A file is not a valid prunekit artifact, or does not fit the model it is loaded into.

    Raised by :func:`prunekit.load`, :func:`prunekit.formats.loads` and
    :func:`prunekit.formats.inspect_file` for anything wrong with the bytes they
    are given: truncation, corruption (checksum mismatch), an inconsistent or
    malformed manifest, sizes beyond the reader's limits, unknown dtypes or
    encodings, a pickle or ``torch.save`` archive, or tensors whose names or
    shapes do not match the target model. The message says what is wrong.

    It subclasses ``ValueError`` so that ``except ValueError`` also catches it.
    Errors of the operating system (a missing file, no permission) are not
    format errors and propagate unchanged.

    Example:
        >>> try:
        ...     prunekit.load("model.pt")  # doctest: +SKIP
        ... except prunekit.FormatError as exc:
        ...     print(exc)
    """
