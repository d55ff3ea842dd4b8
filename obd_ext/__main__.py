"""``python -m obd_ext ...``: the ``obd-ext`` command line (:mod:`obd_ext.cli`)."""

from .cli import main

raise SystemExit(main())
