"""The field's standard open-vocabulary segmentation benchmarks: :func:`get_benchmark` /
:func:`list_benchmarks` (class lists with synonyms, label conventions, Hub ids, evaluation resolution)
and, in :mod:`~opentrans_hf.data.benchmarks.prepare`, converters from their official release layouts."""

from opentrans_hf.data.benchmarks.registry import (
    BENCHMARK_NAMES,
    Benchmark,
    HubSource,
    get_benchmark,
    is_benchmark,
    list_benchmarks,
)

__all__ = ["BENCHMARK_NAMES", "Benchmark", "HubSource", "get_benchmark", "is_benchmark", "list_benchmarks"]
