"""`pytest_test`: a py_test that runs one tests/*_test.py file under pytest."""

def pytest_test(name, src = None, deps = [], data = [], **kwargs):
    """Declares the py_test `name` for the test file `src` (default `name + ".py"`).

    The test's main is a copy of tests/pytest_runner.py, which runs pytest on
    `src` with the workspace's pytest.ini and tests/conftest.py, as the
    README's test command does. The test file is the target's only
    checked-in source file, so tests/build_files_test.py can check that each
    file belongs to exactly one target.

    Args:
      name: target name, by convention the test file's name without `.py`.
      src: the test file; default `name + ".py"`.
      deps: py_library targets the test imports.
      data: files and targets the test reads or runs.
      **kwargs: passed to py_test (size, tags, ...).
    """
    src = src or name + ".py"
    main = name + "_pytest_main.py"
    native.genrule(
        name = name + "_pytest_main",
        srcs = ["//tests:pytest_runner.py"],
        outs = [main],
        cmd = "cp $< $@",
        visibility = ["//visibility:private"],
    )
    native.py_test(
        name = name,
        srcs = [src, main],
        main = main,
        args = ["$(rootpath %s)" % src],
        deps = deps + ["//tests:conftest"],
        data = data + ["//:pytest.ini"],
        python_version = "PY3",
        srcs_version = "PY3",
        **kwargs
    )
