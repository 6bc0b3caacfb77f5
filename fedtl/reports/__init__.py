"""Reports: reading run and study folders, their tables, plots and the HTML report.

A leaf above the models: ``plots`` depends on matplotlib only, so the server draws a run's
plots without importing anything above it.
"""
