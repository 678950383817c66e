"""The pure decision core: no sockets, files, clocks, threads or MTA libraries."""
