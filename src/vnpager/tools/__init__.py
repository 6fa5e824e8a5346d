"""The vnpager command's tools, outside the library: demo, bench, torture."""
