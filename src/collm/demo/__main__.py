from collm.demo.package import main

main()
