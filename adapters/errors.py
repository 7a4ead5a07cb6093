"""Adapter errors. The gateway renders each as an OpenAI envelope (see server/errors.py):

AdapterError
├── AdapterRejectedError    400: the files are not a servable adapter (code names why)
│   └── AdapterTooLargeError 413: a file or the upload is over its size limit
├── AdapterNotFoundError    404: no such adapter for this tenant (or another tenant's)
├── AdapterConflictError    409: the name holds different content and replace was not asked
└── AdapterStoreError       500: the store or registry failed (I/O), nothing half-written
"""

from __future__ import annotations


class AdapterError(Exception):
    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class AdapterRejectedError(AdapterError):
    pass


class AdapterTooLargeError(AdapterRejectedError):
    pass


class AdapterNotFoundError(AdapterError):
    pass


class AdapterConflictError(AdapterError):
    pass


class AdapterStoreError(AdapterError):
    pass
