"""Definitions shared by every layer: dtype tables, the layouts of the op families (read from
``rlkern._C``, where the C++ headers define them) and the option dataclasses with their integer
codes. Both ``rlkern.ops`` and ``rlkern.reference`` import from here; this package imports
neither, so the layers only ever point down (docs/architecture.md).
"""
