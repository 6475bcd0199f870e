"""Demo-only helpers, kept apart from the library proper.

* `xti.demo.builders`: models built from configs (``builtin:tiny-sd1``, ``builtin:tiny-sdxl``, the
  shipped demo model) and the reference SD1.5/SDXL shapes the benches use;
* `xti.demo.procedural`: the procedural shape/colour images the demo concepts are trained on;
* `xti.demo.quality`: the measurable quality checks of the demo (reconstruction, editability,
  layer mixing) that the benches and tests read.

Nothing in the library needs these modules except ``builtin:`` model names, which resolve here.
"""
