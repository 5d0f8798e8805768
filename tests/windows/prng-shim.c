/* bcryptprimitives.dll for Wine 8: Rust's std (1.78+) gets random bytes from ProcessPrng, which
 * Wine 8 does not export. This shim provides it over RtlGenRandom (advapi32!SystemFunction036).
 * Built from source by the Windows test harness (tests/src/wine.rs); placed beside the .exe.
 * Never shipped: real Windows (8.1 and later) has ProcessPrng. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG n = length > 0x10000000 ? 0x10000000 : (ULONG)length;
        if (!SystemFunction036(data, n))
            return FALSE;
        data += n;
        length -= n;
    }
    return TRUE;
}
