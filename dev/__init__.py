"""Developer entry points, run from the repository root (``python -m dev.run`` etc., the Makefile's targets):
``run`` (``make flow-run``), ``ui`` (``make ui``/``ui-down``/``deploy``), ``services`` (``make services-up``/
``services-down``) and ``bench`` (``make bench-flow``). Not installed with the package."""
