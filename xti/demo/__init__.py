"""The demo's data, kept apart from the library proper.

* `xti.demo.procedural`: the procedural shape/colour images the demo concepts are trained on, and
  `measure`, which reads shape, colour and size back from an image.

It builds on nothing in xti. The demo harness that trains and scores demo concepts is `xti.quality`
(used by the benches and tests); ``builtin:`` models are the library's (`xti.builtin`). Only that
harness, the web UI and the CLI import this package.
"""
