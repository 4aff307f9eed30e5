PYTHON ?= python3

.PHONY: run test bench clean

run:            ## serve on 8080 with data in ./data
	./run.sh

test:           ## the whole test suite (stdlib unittest)
	$(PYTHON) -m tests

bench:          ## the benchmark; writes bench/out/
	$(PYTHON) -m bench.run

clean:
	rm -rf data bench/out __pycache__ */__pycache__
