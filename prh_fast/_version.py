"""The package version's one home: read by ``prh_fast.__init__``, ``prh_fast._info`` and the build
(setup.py's ``_version()`` and pyproject's ``[tool.setuptools.dynamic]``)."""
__version__ = "0.1.0"
