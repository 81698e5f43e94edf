import os
import re

from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


VERSION = re.search(r'^__version__ = "([^"]+)"', read("djmemcache/__init__.py"), re.M).group(1)

setup(
    name="djmemcache",
    version=VERSION,
    description="Django cache backend for memcached with a process-wide connection pool, "
                "built on pymemcache",
    long_description=read("README.rst"),
    long_description_content_type="text/x-rst",
    license="Apache-2.0",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks", "demo", "demo.*"]),
    include_package_data=True,
    python_requires=">=3.10",
    # Optional: without a C compiler the package installs and runs in pure
    # Python (djmemcache/_speedups.c says what it speeds up).
    ext_modules=[Extension("djmemcache._speedups", ["djmemcache/_speedups.c"], optional=True)],
    install_requires=["Django>=4.2", "pymemcache>=4.0", "mmh3>=4.0"],
    extras_require={
        "test": ["pytest>=8.2", "trustme>=1.0", "zstandard>=0.20",
                 "gevent>=23.9", "gunicorn>=21.2", "uvicorn>=0.23"],
        "zstd": ["zstandard>=0.20"],
        "bench": ["pylibmc>=1.6"],
    },
    classifiers=[
        "Development Status :: 5 - Production/Stable",
        "Environment :: Web Environment",
        "Framework :: Django",
        "Framework :: Django :: 4.2",
        "Framework :: Django :: 5.2",
        "Framework :: Django :: 6.0",
        "Framework :: Django :: 6.1",
        "Intended Audience :: Developers",
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: POSIX",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Internet :: WWW/HTTP",
    ],
)
