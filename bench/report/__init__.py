"""The benchmark's report: figures as cells (cells), runs paired by round (compare), the results
and CPU tables (tables), the performance targets (checks), the scale-out sections (scaleout), the
markdown document (markdown) and the plot over time (plot). Import the modules themselves."""
