from qes_edge.entry import main

main()
