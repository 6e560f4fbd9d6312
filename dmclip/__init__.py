"""dmclip: vision-language distillation experiments (pretrain, distill, capfilt, compress, eval)."""

import logging as _logging

__version__ = "0.1.0"


class _DropNoCudaRuntime(_logging.Filter):
    """torch's cpp_extension warns "No CUDA runtime is found" on every CPU machine when it is imported (we
    build a CPU extension); users read it as a failure. Only that message is dropped."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in str(record.msg)


_logging.getLogger("torch.utils.cpp_extension").addFilter(_DropNoCudaRuntime())
