"""Self-contained HTML pages: the net viewer (``net_view``) and the training report
(``run_report``), with their shared style and SVG charts (``svg``)."""
