"""traqmilter: complete, safe control over mail for unknown local recipients."""

__version__ = "0.1.0"
