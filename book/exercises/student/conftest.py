"""The student versions of the exercise notebooks are not run by nbval (``make
notebooks`` collects every notebook under book/): their cells ``raise
NotImplementedError`` by design.

They are made from the solved notebooks one folder up by
``ci/make_student_notebooks.py``; ci/test_make_student_notebooks.py checks that
they are up to date, that no solution leaks into them, and that running one
reports the missing code through the checkers' message.
"""

collect_ignore_glob = ["*.ipynb"]
