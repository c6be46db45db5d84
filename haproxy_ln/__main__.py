from haproxy_ln.cli import main

main(prog_name="haproxy-ln")
