"""Code that reaches below a library's public API, fenced: one module per library.

Each module states what it relies on, applies only where that holds, and has a test
(tests/test_fences.py) that fails loudly when an upgrade changes it.
"""
