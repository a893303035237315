"""``python -m benchmarks``: run the throughput and latency benchmark."""

from benchmarks.throughput import main

raise SystemExit(main())
