# A guest test that fails: the check below is false, the script exits 3.
echo "test: looking for /etc/does-not-exist"
if [ ! -e /etc/does-not-exist ]; then
    echo "test: FAIL: /etc/does-not-exist is missing"
    exit 3
fi
echo "ALL TESTS PASSED"
